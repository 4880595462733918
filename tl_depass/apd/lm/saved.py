"""A `ParamDecomposition` on disk: `<path>.safetensors` (every tensor) and `<path>.json` (the
sites, the config and measured numbers). Nothing in either file can run code; a damaged or
mismatched pair raises a DepassError naming the file."""

import json
from pathlib import Path

from safetensors.torch import save_file

from tl_depass.apd.lm.sites import MATRICES, SiteSpec, site_key
from tl_depass.engine.files import check_tensors, read_json, read_safetensors, require_keys
from tl_depass.errors import DepassError

FORMAT = "tl_depass.param_decomposition/1"
SITE_FIELDS = {"name": str, "layer": int, "matrix": str, "input_hook": str, "output_hook": str,
               "in_heads": int, "out_heads": int, "C": int, "d_in": int, "d_out": int,
               "ci_hidden": int}


def save(dec, path: str | Path) -> None:
    """Write `dec` (a ParamDecomposition) as `<path>.safetensors` and `<path>.json`."""
    base = Path(path).with_suffix("")
    save_file({k: v.detach().contiguous() for k, v in dec.state_dict().items()},
              str(base.with_suffix(".safetensors")))
    record = {"format": FORMAT, "sites": [s.describe() for s in dec], "meta": dec.meta}
    base.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")


def load(cls, path: str | Path):
    """The decomposition (of class `cls`) that `save` wrote under `path`."""
    base = Path(path).with_suffix("")
    pair = base.with_suffix(".json"), base.with_suffix(".safetensors")
    missing = [str(p) for p in pair if not p.exists()]
    if missing:
        raise DepassError(f"a saved ParamDecomposition is a .json and a .safetensors side by "
                          f"side; missing {missing}")
    record = read_json(pair[0], "saved ParamDecomposition")
    if record.get("format") != FORMAT:
        raise DepassError(f"{pair[0]} is not a saved ParamDecomposition (format "
                          f"{record.get('format')!r}, expected {FORMAT!r})")
    sites, C, ci_hidden = checked_sites(record, pair[0])
    state = read_safetensors(pair[1], "saved ParamDecomposition")
    fixed = {f"sites.{site_key(s['name'])}.{n}": shape for s in sites
             for n, shape in (("weight", (s["d_in"], s["d_out"])), ("bias", (s["d_out"],)))}
    check_tensors(fixed, {k: v for k, v in state.items() if k in fixed}, pair[1],
                  f"the sites in {pair[0].name}")
    specs = [SiteSpec(s["name"], s["layer"], s["matrix"], s["input_hook"], s["output_hook"],
                      state[f"sites.{site_key(s['name'])}.weight"],
                      state[f"sites.{site_key(s['name'])}.bias"], s["in_heads"], s["out_heads"])
             for s in sites]
    dec = cls(specs, C, ci_hidden, meta=record["meta"])
    check_tensors({k: tuple(v.shape) for k, v in dec.state_dict().items()}, state, pair[1],
                  f"the sites in {pair[0].name}")
    dec.load_state_dict(state)
    return dec


def checked_sites(record: dict, path: Path) -> tuple[list[dict], int, int]:
    """(sites, C, ci_hidden) of a saved decomposition's JSON, every field checked."""
    require_keys(record, ("sites", "meta"), path, "saved ParamDecomposition")
    sites = record["sites"]
    if not (isinstance(sites, list) and sites and isinstance(record["meta"], dict)):
        raise DepassError(f"{path}: 'sites' must be a non-empty list and 'meta' an object; the "
                          "file is damaged: save the decomposition again")
    for i, site in enumerate(sites):
        bad = [k for k, kind in SITE_FIELDS.items() if not isinstance(site, dict)
               or not isinstance(site.get(k), kind) or isinstance(site.get(k), bool)
               or (kind is int and site[k] < 0)]
        if bad or site["matrix"] not in MATRICES:
            raise DepassError(f"{path}: site {i} has missing or invalid {bad or ['matrix']} (each "
                              f"site needs {list(SITE_FIELDS)}, matrix one of {MATRICES}); the file "
                              "is damaged: save the decomposition again")
    sizes = {(s["C"], s["ci_hidden"]) for s in sites}
    if len(sizes) != 1 or 0 in sizes.pop():
        raise DepassError(f"{path}: every site must have the same positive C and ci_hidden, got "
                          f"{sorted({(s['C'], s['ci_hidden']) for s in sites})}")
    return sites, sites[0]["C"], sites[0]["ci_hidden"]
