//! `kiln plan`: the parsed and resolved build, without building.
use anyhow::{anyhow, Result};

use kiln_engine::dockerfile::{self, StageGraph};

use crate::args::{PlanArgs, PlanFormat};
use crate::build::{parse_pairs, read_dockerfile};

pub fn run(a: PlanArgs) -> Result<()> {
    let (name, text) = read_dockerfile(&a.frontend, None)?;
    let located = |e: dockerfile::FrontendError| anyhow!("{name}:{}: {}", e.line, e.message);
    let df = dockerfile::parse(&text).map_err(located)?;
    let build_args = parse_pairs("--build-arg", &a.frontend.build_args)?;
    let platform = kiln_cachestore::Platform::host();
    let graph = StageGraph::resolve(
        &df,
        &build_args,
        a.frontend.target.as_deref(),
        &dockerfile::Platform {
            os: platform.os,
            architecture: platform.architecture,
            variant: platform.variant,
        },
    )
    .map_err(located)?;
    match a.format {
        PlanFormat::Json => println!(
            "{}",
            serde_json::to_string_pretty(&dockerfile::plan_document(&graph, &df))?
        ),
        PlanFormat::Text => print!("{}", dockerfile::plan_text(&graph, &df)),
    }
    Ok(())
}
