"""Offline validation of Kubernetes manifests: core kinds, our custom resources, and the admission rules
that only a cluster would otherwise tell you about.

    python -m trafficvlm.k8s_validate manifests/ --kube-version 1.30.0
    helm template x helm/trafficvlm-nim | python -m trafficvlm.k8s_validate -

    from trafficvlm.k8s_validate import validate_manifests
    errors = validate_manifests("manifests/rbac/launcher.yaml")       # [] when valid

What is checked, per object:
- YAML is loaded with a loader that rejects duplicate keys (PyYAML keeps the last one silently, which
  hides copy-paste mistakes such as two `env:` blocks);
- `metadata.name` is a DNS-1123 subdomain (the API server's rule for every object);
- core kinds against the Kubernetes JSON schemas shipped in `kubernetes-validate` (strict: unknown
  fields are errors). It reports one error per object and skips enums;
- custom resources against their CRD's `openAPIV3Schema` with jsonschema Draft 7, made strict
  (`additionalProperties: false` where a node lists `properties` and does not preserve unknown fields;
  `nullable` mapped to a null type), plus the CRD's CEL rules (`x-kubernetes-validations`) that do not
  use `oldSelf`, when cel-python is installed;
- controller rules no schema carries: the Training Operator webhook for PyTorchJob (containers named
  `pytorch`, replica types Master/Worker only, exactly one Master) and KFP's six-field cron for
  ScheduledWorkflow.

CRDs come from `manifests/crds/` (vendored, Apache-2.0) and, when present, the project's shared schema
directory `<repo>/../shared/schemas` (override with env `TRAFFICVLM_SCHEMAS`). A kind with no schema is an
error: nothing here passes unchecked.
"""

from __future__ import annotations

import argparse
import copy
import functools
import logging
import os
import re
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
VENDORED_CRDS = REPO_ROOT / "manifests" / "crds"
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
YAML_SUFFIXES = (".yaml", ".yml")


# --- loading --------------------------------------------------------------------------------------------

class UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that raises on a mapping key given twice."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"found duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_documents(text: str) -> list[Any]:
    """All YAML documents of `text` (empty documents dropped); duplicate keys raise yaml.YAMLError."""
    return [doc for doc in yaml.load_all(text, Loader=UniqueKeyLoader) if doc is not None]


def yaml_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Expand directories to the YAML files under them (sorted); files are kept as given."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.suffix in YAML_SUFFIXES and f.is_file())
        else:
            out.append(p)
    return out


# --- CRD schemas ----------------------------------------------------------------------------------------

def schema_dirs() -> list[Path]:
    """Where CRDs are looked up, first match wins: vendored, then the shared schemas (or $TRAFFICVLM_SCHEMAS)."""
    shared = Path(os.environ.get("TRAFFICVLM_SCHEMAS") or REPO_ROOT.parent / "shared" / "schemas")
    return [d for d in (VENDORED_CRDS, shared) if d.is_dir()]


@functools.lru_cache(maxsize=4)
def crd_index(dirs: tuple[Path, ...]) -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> openAPIV3Schema of every served version of every CRD found under `dirs`."""
    index: dict[tuple[str, str], dict[str, Any]] = {}
    for path in yaml_files(dirs):
        try:
            docs = load_documents(path.read_text())
        except yaml.YAMLError:
            continue  # fixtures and values files live beside the CRDs; only CRDs matter here
        for doc in docs:
            if not (isinstance(doc, dict) and doc.get("kind") == "CustomResourceDefinition"):
                continue
            spec = doc["spec"]
            for version in spec.get("versions", []):
                schema = (version.get("schema") or {}).get("openAPIV3Schema")
                if version.get("served") and schema:
                    key = (f"{spec['group']}/{version['name']}", spec["names"]["kind"])
                    index.setdefault(key, schema)
    return index


def strict_schema(node: Any) -> Any:
    """A Draft 7 copy of an OpenAPI v3 structural schema that rejects unknown fields."""
    if isinstance(node, list):
        return [strict_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: strict_schema(v) for k, v in node.items()}
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    if out.get("x-kubernetes-int-or-string"):
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if "properties" in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        if out.get("x-kubernetes-embedded-resource"):  # apiVersion/kind/metadata are implied
            for implied in ("apiVersion", "kind", "metadata"):
                out["properties"].setdefault(implied, {})
        out.setdefault("additionalProperties", False)
    return out


@functools.lru_cache(maxsize=64)
def _crd_validator(dirs: tuple[Path, ...], api_version: str, kind: str) -> Any:
    import jsonschema

    schema = crd_index(dirs).get((api_version, kind))
    if schema is None:
        return None
    return jsonschema.Draft7Validator(strict_schema(copy.deepcopy(schema))), schema


# --- CEL rules (x-kubernetes-validations) ---------------------------------------------------------------

def cel_errors(schema: dict[str, Any], value: Any, path: str = "") -> list[str]:
    """Evaluate the CEL rules of `schema` on `value`, recursively; rules using `oldSelf` (updates) skip."""
    try:
        import celpy
    except ImportError:
        log.warning("cel-python is not installed: CEL rules (x-kubernetes-validations) are not checked")
        return []
    return list(_walk_cel(celpy, schema, value, path))


def _walk_cel(celpy: Any, schema: dict[str, Any], value: Any, path: str) -> Iterator[str]:
    if value is None:
        return
    for rule in schema.get("x-kubernetes-validations", []):
        if "oldSelf" in rule["rule"]:
            continue
        if not _cel_holds(celpy, rule["rule"], value):
            yield f"{path or '<root>'}: {rule.get('message') or 'failed rule ' + rule['rule']}"
    if isinstance(value, dict):
        for key, sub in value.items():
            child = (schema.get("properties") or {}).get(key)
            if child is None and isinstance(schema.get("additionalProperties"), dict):
                child = schema["additionalProperties"]
            if child is not None:
                yield from _walk_cel(celpy, child, sub, f"{path}.{key}" if path else key)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, sub in enumerate(value):
            yield from _walk_cel(celpy, schema["items"], sub, f"{path}[{i}]")


@functools.lru_cache(maxsize=256)
def _cel_program(celpy: Any, rule: str) -> Any:
    env = celpy.Environment()
    return env.program(env.compile(rule))


def _cel_holds(celpy: Any, rule: str, value: Any) -> bool:
    result = _cel_program(celpy, rule).evaluate({"self": celpy.json_to_cel(value)})
    if isinstance(result, Exception):  # celpy returns evaluation errors (e.g. no such key) as values
        return False
    return bool(result)


# --- controller / webhook rules -------------------------------------------------------------------------

def pytorchjob_webhook_errors(obj: dict[str, Any]) -> list[str]:
    """The Training Operator v1 webhook's checks, which the CRD schema does not express."""
    errors = []
    specs = (obj.get("spec") or {}).get("pytorchReplicaSpecs") or {}
    if not specs:
        errors.append("spec.pytorchReplicaSpecs: at least one replica type is required")
    for rtype, spec in specs.items():
        where = f"spec.pytorchReplicaSpecs.{rtype}"
        if rtype not in ("Master", "Worker"):
            errors.append(f"{where}: replica type must be Master or Worker")
        if rtype == "Master" and (spec or {}).get("replicas", 1) != 1:
            errors.append(f"{where}.replicas: must be exactly 1, got {spec.get('replicas')!r}")
        containers = (((spec or {}).get("template") or {}).get("spec") or {}).get("containers") or []
        if not any(isinstance(c, dict) and c.get("name") == "pytorch" for c in containers):
            errors.append(f"{where}.template.spec.containers: one container must be named 'pytorch'")
    return errors


def scheduledworkflow_errors(obj: dict[str, Any]) -> list[str]:
    """KFP's ScheduledWorkflow CRD is schemaless; check the fields the controller parses."""
    spec = obj.get("spec") or {}
    trigger = spec.get("trigger") or {}
    errors = []
    if not (trigger.get("cronSchedule") or trigger.get("periodicSchedule")):
        errors.append("spec.trigger: needs cronSchedule or periodicSchedule")
    cron = (trigger.get("cronSchedule") or {}).get("cron")
    if cron is not None and len(str(cron).split()) != 6:
        errors.append(f"spec.trigger.cronSchedule.cron: KFP cron has six fields (seconds first), got {cron!r}")
    if "maxConcurrency" in spec and not (isinstance(spec["maxConcurrency"], int) and spec["maxConcurrency"] >= 1):
        errors.append(f"spec.maxConcurrency: must be an integer >= 1, got {spec['maxConcurrency']!r}")
    if not (spec.get("workflow") or spec.get("pipelineId") or spec.get("pipelineVersionId")):
        errors.append("spec: needs workflow, pipelineId or pipelineVersionId")
    return errors


CONTROLLER_RULES = {
    ("kubeflow.org/v1", "PyTorchJob"): pytorchjob_webhook_errors,
    ("kubeflow.org/v1beta1", "ScheduledWorkflow"): scheduledworkflow_errors,
}


# --- one object -----------------------------------------------------------------------------------------

def validate_object(obj: Any, kube_version: str = "1.30.0") -> list[str]:
    """Errors of one Kubernetes object (messages without location prefix)."""
    if not isinstance(obj, dict) or not obj.get("apiVersion") or not obj.get("kind"):
        return ["not a Kubernetes object (needs apiVersion and kind)"]
    meta = obj.get("metadata") or {}
    name = meta.get("name")
    errors = []
    generated = name is None and "generateName" in meta  # the API server picks the name at creation
    if not generated and not (isinstance(name, str) and DNS1123_SUBDOMAIN.match(name) and len(name) <= 253):
        errors.append(f"metadata.name: {name!r} is not a DNS-1123 subdomain (lowercase, digits, '-', '.')")
    key = (obj["apiVersion"], obj["kind"])
    checked = _validate_crd(obj, key)
    if checked is None:
        checked = _validate_core(obj, kube_version)
    errors += checked
    errors += CONTROLLER_RULES.get(key, lambda _: [])(obj)
    return errors


def _validate_crd(obj: dict[str, Any], key: tuple[str, str]) -> list[str] | None:
    found = _crd_validator(tuple(schema_dirs()), *key)
    if found is None:
        return None
    validator, raw_schema = found
    errors = [f"{_json_path(e.absolute_path)}: {e.message}"
              for e in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))]
    return errors + cel_errors(raw_schema, obj)


def _validate_core(obj: dict[str, Any], kube_version: str) -> list[str]:
    import kubernetes_validate as kv

    try:
        kv.validate(obj, kube_version, strict=True)
    except kv.SchemaNotFoundError as exc:
        return [f"no schema for {obj['apiVersion']} {obj['kind']}: not a core kind and no CRD found in "
                f"{', '.join(map(str, schema_dirs())) or 'no schema directory'} ({exc.message})"]
    except kv.ValidationError as exc:
        return [f"{_json_path(exc.absolute_path)}: {exc.message}"]
    return []


def _json_path(parts: Iterable[Any]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "<root>"


# --- public entry ---------------------------------------------------------------------------------------

def validate_manifests(source: Any, kube_version: str = "1.30.0") -> list[str]:
    """Validate manifests; returns a list of errors, empty when all is valid.

    `source`: a path (file or directory), a list of paths, one object (dict) or a list of objects.
    Each error names the file (or `<docs>`), the document index, kind/name, the field and the reason."""
    errors: list[str] = []
    for origin, docs in _sources(source):
        if isinstance(docs, str):  # a load error
            errors.append(f"{origin}: {docs}")
            continue
        for i, obj in enumerate(docs):
            label = f"{origin} doc {i} ({_describe(obj)})"
            errors += [f"{label}: {msg}" for msg in validate_object(obj, kube_version)]
    return errors


def _sources(source: Any) -> Iterator[tuple[str, list[Any] | str]]:
    if isinstance(source, dict):
        yield "<docs>", [source]
        return
    items = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    if items and all(isinstance(x, dict) for x in items):
        yield "<docs>", items
        return
    for path in yaml_files(items):
        try:
            yield str(path), load_documents(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            yield str(path), f"cannot load: {exc}"


def _describe(obj: Any) -> str:
    if not isinstance(obj, dict):
        return type(obj).__name__
    return f"{obj.get('kind', '?')}/{(obj.get('metadata') or {}).get('name', '?')}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trafficvlm.k8s_validate", description=__doc__.split("\n\n")[0],
        epilog="examples:\n  python -m trafficvlm.k8s_validate manifests/\n"
               "  helm template r helm/trafficvlm-nim | python -m trafficvlm.k8s_validate -",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="YAML files or directories; '-' reads stdin")
    parser.add_argument("--kube-version", default="1.30.0")
    args = parser.parse_args(argv)
    if args.paths == ["-"]:
        try:
            errors = validate_manifests(load_documents(sys.stdin.read()), args.kube_version)
        except yaml.YAMLError as exc:
            errors = [f"<stdin>: cannot load: {exc}"]
    else:
        errors = validate_manifests(args.paths, args.kube_version)
    for e in errors:
        print(e)
    print(f"{len(errors)} error(s)", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
