"""Checks deploy/'s Tekton Task and GitLab CI template offline (no Tekton
CRD schema can be had here): they parse, carry the fields their systems
require, and every parameter and result they reference is declared.
Prints, one per line, every `--flag` the deployment files pass to Kiln,
for the Rust test to check against `kiln build --help`.

usage: python3 deploy_manifests.py DEPLOY_DIR"""
import re
import sys
import pathlib

import yaml

deploy = pathlib.Path(sys.argv[1])
errors = []
flags = set()


def need(cond, what):
    if not cond:
        errors.append(what)


def kiln_flags(words):
    for word in words:
        for m in re.finditer(r"(?:^|\s)(--[a-z][a-z0-9-]*)", word):
            flags.add(m.group(1))


task = yaml.safe_load((deploy / "tekton/kiln-task.yaml").read_text())
need(task.get("apiVersion") == "tekton.dev/v1", "tekton: apiVersion tekton.dev/v1")
need(task.get("kind") == "Task", "tekton: kind Task")
need(bool(task.get("metadata", {}).get("name")), "tekton: metadata.name")
spec = task.get("spec", {})
steps = spec.get("steps") or []
need(steps, "tekton: spec.steps")
names = [s.get("name") for s in steps]
need(len(set(names)) == len(names) and all(names), "tekton: every step has a unique name")
need(all(s.get("image") for s in steps), "tekton: every step has an image")
params = {p["name"] for p in spec.get("params", [])}
results = {r["name"] for r in spec.get("results", [])}
workspaces = {w["name"] for w in spec.get("workspaces", [])}
need({"IMAGE_DIGEST", "IMAGE_URL"} <= results, "tekton: IMAGE_DIGEST and IMAGE_URL results")
text = (deploy / "tekton/kiln-task.yaml").read_text()
for p in re.findall(r"\$\(params\.([A-Za-z_]+)", text):
    need(p in params, f"tekton: $(params.{p}) is not declared")
for r in re.findall(r"\$\(results\.([A-Za-z_]+)\.path\)", text):
    need(r in results, f"tekton: $(results.{r}) is not declared")
for w in re.findall(r"\$\(workspaces\.([A-Za-z_]+)\.", text):
    need(w in workspaces, f"tekton: $(workspaces.{w}) is not declared")
build = steps[0] if steps else {}
need(any("--digest-file=$(results.IMAGE_DIGEST.path)" == a for a in build.get("args", [])),
     "tekton: IMAGE_DIGEST comes from --digest-file")
kiln_flags(build.get("args", []))

gitlab = yaml.safe_load((deploy / "gitlab/kiln.gitlab-ci.yml").read_text())
job = gitlab.get(".kiln-build", {})
need(job.get("image", {}).get("name", "").endswith(":debug"), "gitlab: the debug image")
need(job.get("image", {}).get("entrypoint") == [""], "gitlab: entrypoint overridden")
script = job.get("script") or []
need(script, "gitlab: script")
kiln_flags([line for line in script if line.lstrip().startswith("kiln")])

for path in sorted((deploy / "kubernetes").glob("*.yaml")):
    for doc in yaml.safe_load_all(path.read_text()):
        pod = doc["spec"]["template"]["spec"]
        for c in pod["containers"]:
            kiln_flags(c.get("args", []))
        # A Job for one architecture builds for the nodes it is pinned to.
        arch = pod.get("nodeSelector", {}).get("kubernetes.io/arch")
        custom = [a for c in pod["containers"] for a in c.get("args", [])
                  if a.startswith("--custom-platform=")]
        need(not custom or custom == [f"--custom-platform=linux/{arch}"],
             f"{path.name}: {doc['metadata']['name']} builds {custom} on {arch} nodes")

if errors:
    sys.exit("\n".join(errors))
print("\n".join(sorted(flags)))
