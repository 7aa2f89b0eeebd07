//! `--platform P1,P2`: which platforms one build makes, the annotations
//! its manifests and index carry, and how the images become one output.
use anyhow::{bail, Result};

use kiln_cachestore::{BlobStore, Platform};
use kiln_engine::output::{self, Annotations, Built, BuiltImage};

use crate::build::parse_platform;
use crate::sink::{sink, Record};

/// The platforms to build: `--platform`'s, each once in the order given,
/// else `--custom-platform`'s (or the host's).
pub fn parse(platforms: &[String], custom: Option<&str>) -> Result<Vec<Platform>> {
    if platforms.is_empty() {
        return Ok(vec![parse_platform(custom)?]);
    }
    let mut out: Vec<Platform> = Vec::new();
    for spec in platforms {
        let platform =
            parse_platform(Some(spec.trim())).map_err(|e| anyhow::anyhow!("--platform: {e}"))?;
        if !out.contains(&platform) {
            out.push(platform);
        }
    }
    Ok(out)
}

/// `--annotation [manifest:|index:]KEY=VALUE`, as buildx takes it (no
/// prefix: the manifest). `index:` needs an index (`makes_index`: two
/// platforms or more, or `--provenance`).
pub fn annotations(specs: &[String], makes_index: bool) -> Result<Annotations> {
    let mut out = Annotations::default();
    for spec in specs {
        let (map, pair) = match spec.split_once(':') {
            Some(("manifest", pair)) => (&mut out.manifest, pair),
            Some(("index", pair)) => (&mut out.index, pair),
            _ => (&mut out.manifest, spec.as_str()),
        };
        match pair.split_once('=') {
            Some((k, v)) if !k.is_empty() => {
                map.insert(k.to_string(), v.to_string());
            }
            _ => bail!("--annotation {spec:?}: expected [manifest:|index:]KEY=VALUE"),
        }
    }
    if !out.index.is_empty() && !makes_index {
        bail!("--annotation index:…: a single-platform build makes no index (give --platform with two platforms or more, --provenance, or use manifest:)");
    }
    Ok(out)
}

/// One image stays an image; several, or any with attestations, become an
/// index.
pub fn combine(
    store: &BlobStore,
    mut images: Vec<BuiltImage>,
    attestations: Vec<BuiltImage>,
    annotations: &Annotations,
) -> Result<Built> {
    Ok(match (images.len(), attestations.is_empty()) {
        (1, true) => Built::Image(images.remove(0)),
        _ => Built::Index(output::assemble_index(
            store,
            images,
            attestations,
            &annotations.index,
        )?),
    })
}

/// `==> platform linux/arm64`: the builds that follow are for it.
pub fn log_platform(platform: &Platform) {
    sink().log(
        Record::info(format!("==> platform {platform}"))
            .field("event", "platform")
            .field("platform", platform.to_string()),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platforms_are_comma_separated_or_repeated_and_kept_once() {
        let got = parse(
            &[
                "linux/amd64".into(),
                "linux/arm64".into(),
                "linux/amd64".into(),
            ],
            None,
        )
        .unwrap();
        let names: Vec<String> = got.iter().map(Platform::to_string).collect();
        assert_eq!(names, ["linux/amd64", "linux/arm64"]);
        assert_eq!(
            parse(&[], Some("linux/arm/v7")).unwrap()[0].to_string(),
            "linux/arm/v7"
        );
        let e = parse(&["linux".into()], None).unwrap_err().to_string();
        assert!(e.contains("--platform") && e.contains("os/arch"), "{e}");
        assert!(parse(&["linux/".into()], None).is_err());
    }

    #[test]
    fn annotations_go_to_the_manifest_unless_prefixed_index() {
        let a = annotations(
            &[
                "a=1".into(),
                "manifest:b=2".into(),
                "index:c=3".into(),
                "org.x:y=z".into(),
            ],
            true,
        )
        .unwrap();
        assert_eq!(a.manifest.len(), 3);
        assert_eq!(a.manifest["org.x:y"], "z");
        assert_eq!(a.index["c"], "3");
        assert!(annotations(&["index:c=3".into()], false).is_err());
        assert!(annotations(&["novalue".into()], false).is_err());
        assert!(annotations(&["index:=v".into()], true).is_err());
    }
}
