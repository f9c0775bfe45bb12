"""Vendors the InferenceService v1beta1 schema from KServe's CRD, pruned to stay small.

    git -C KSERVE show COMMIT:config/crd/full/serving.kserve.io_inferenceservices.yaml \
        | python deploy/schemas/vendor_kserve_schema.py COMMIT > deploy/schemas/inferenceservice-v1beta1.json

The full schema is 0.7 MB, mostly pod-spec fields repeated for every component. Descriptions
are dropped and subtrees over 4 KB cut down to their type, except on the path to
spec.predictor.model (what our manifest configures), which is kept whole; every property name is
kept, so a misspelt field is still caught (the test forbids unknown fields, as kubectl does).
"""

import json
import sys

import yaml

KEEP_WHOLE = ("spec", "predictor", "model")
MAX_SUBTREE = 4096


def strip(schema):
    """The schema without descriptions (they are most of its size)."""
    if isinstance(schema, dict):
        return {k: strip(v) for k, v in schema.items() if k != "description"}
    if isinstance(schema, list):
        return [strip(v) for v in schema]
    return schema


def prune(schema: dict, path: tuple = ()) -> dict:
    """Keeps the path to spec.predictor.model and small subtrees whole; cuts the rest to their type."""
    if path == KEEP_WHOLE or len(json.dumps(schema)) <= MAX_SUBTREE:
        return schema
    if path != KEEP_WHOLE[: len(path)]:
        return {k: v for k, v in schema.items() if k == "type" or k.startswith("x-kubernetes")}
    return dict(schema, properties={name: prune(sub, path + (name,)) for name, sub in schema["properties"].items()})


def main() -> None:
    commit = sys.argv[1]
    crd = yaml.safe_load(sys.stdin)
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1beta1")
    schema = prune(strip(version["schema"]["openAPIV3Schema"]))
    schema["$comment"] = (
        f"kserve/kserve@{commit} config/crd/full/serving.kserve.io_inferenceservices.yaml, "
        "v1beta1, pruned by deploy/schemas/vendor_kserve_schema.py"
    )
    json.dump(schema, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
