//! `kiln plan`: the parsed and resolved build, without building.
use anyhow::Result;

use kiln_engine::dockerfile;

use crate::args::{PlanArgs, PlanFormat};
use crate::build::resolve_graph;

pub fn run(a: PlanArgs) -> Result<()> {
    let (df, graph) = resolve_graph(&a.frontend, &kiln_cachestore::Platform::host())?;
    match a.format {
        PlanFormat::Json => println!(
            "{}",
            serde_json::to_string_pretty(&dockerfile::plan_document(&graph, &df))?
        ),
        PlanFormat::Text => print!("{}", dockerfile::plan_text(&graph, &df)),
    }
    Ok(())
}
