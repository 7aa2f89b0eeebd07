//! `--metadata-file`: the build's result as JSON, with buildx's keys where
//! they apply, so CI that reads buildx's file reads Kiln's, plus Kiln's
//! own summary under `kiln.build`.
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{json, Map, Value};

use kiln_cachestore::Platform;
use kiln_engine::{Built, Summary};

use crate::report::{ms, Finished};

/// The metadata document: `containerimage.digest` and
/// `containerimage.descriptor` name what the tags point at (the index for
/// several platforms), `image.name` the destinations, comma-separated.
pub fn document(
    built: &Built,
    names: &[String],
    platforms: &[Platform],
    summaries: &[Summary],
    finished: &Finished,
) -> Value {
    let descriptor = built.descriptor();
    let mut total = Summary::default();
    summaries.iter().for_each(|s| total.add(s));
    let mut phases: Map<String, Value> = total
        .phases
        .iter()
        .map(|(phase, d)| (phase.to_string(), ms(*d).into()))
        .collect();
    phases.insert("outputs".into(), ms(finished.outputs).into());
    let images: Vec<Value> = built
        .images()
        .iter()
        .zip(platforms)
        .map(|(image, platform)| {
            json!({"platform": platform.to_string(), "digest": image.manifest.digest.to_string()})
        })
        .collect();
    let mut doc = json!({
        "containerimage.digest": descriptor.digest.to_string(),
        "containerimage.descriptor": descriptor,
        "kiln.build": {
            "images": images,
            "steps": {
                "local_hits": total.cache_hits - total.remote_hits,
                "remote_hits": total.remote_hits,
                "run": total.cache_misses,
            },
            "layers_unpacked": total.layers_unpacked,
            "bytes_pulled": finished.pulled,
            "bytes_pushed": finished.pushed,
            "blobs_mounted": finished.mounted,
            "phases_ms": phases,
            "duration_ms": ms(finished.elapsed),
        },
    });
    if !names.is_empty() {
        doc["image.name"] = names.join(",").into();
    }
    doc
}

pub fn write(
    path: &Path,
    built: &Built,
    names: &[String],
    platforms: &[Platform],
    summaries: &[Summary],
    finished: &Finished,
) -> Result<()> {
    let doc = document(built, names, platforms, summaries, finished);
    let mut text = serde_json::to_string_pretty(&doc).expect("JSON values serialize");
    text.push('\n');
    std::fs::write(path, text).with_context(|| format!("--metadata-file {}", path.display()))
}
