"""Rebuild leaderworkerset-v1.json from the LeaderWorkerSet CRD of kubernetes-sigs/lws:

    python tests/k8s_schemas/vendor_lws.py PATH/TO/leaderworkerset.x-k8s.io_leaderworkersets.yaml

Keeps the openAPIV3Schema of version v1 and drops the human-readable `description`
texts (most of the file's size; they do not take part in validation)."""

import json
import pathlib
import sys

import yaml


def strip_descriptions(node, in_properties=False):
    """The schema without `description` keywords (a property named "description" stays)."""
    if isinstance(node, list):
        return [strip_descriptions(v) for v in node]
    if not isinstance(node, dict):
        return node
    return {k: strip_descriptions(v, in_properties=(k == "properties" and not in_properties))
            for k, v in node.items() if in_properties or k != "description"}


def main(crd_path: str) -> None:
    crd = yaml.safe_load(pathlib.Path(crd_path).read_text())
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = strip_descriptions(v1["schema"]["openAPIV3Schema"])
    out = pathlib.Path(__file__).with_name("leaderworkerset-v1.json")
    out.write_text(json.dumps(schema, sort_keys=True, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
