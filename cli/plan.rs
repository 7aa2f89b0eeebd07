//! `kiln plan`: the stage report (the parsed and resolved stage graph),
//! without building.
use anyhow::Result;

use kiln_engine::dockerfile;

use crate::args::{PlanArgs, PlanFormat};
use crate::build::resolve_graph;

pub fn run(a: PlanArgs) -> Result<()> {
    let (df, graph) = resolve_graph(&a.frontend, &kiln_cachestore::Platform::host())?;
    match a.format {
        PlanFormat::Json => println!(
            "{}",
            serde_json::to_string_pretty(&dockerfile::stage_report_json(&graph))?
        ),
        PlanFormat::Text => print!("{}", dockerfile::stage_report_text(&graph, &df)),
    }
    Ok(())
}
