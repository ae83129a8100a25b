"""UI-graph <-> API-prompt helpers for the shipped workflows. Pure Python: no ComfyUI import.

`schema` arguments are `/object_info`-shaped: ``{class_type: {"input": {"required": {...}, "optional": {...}},
"input_order": {"required": [...], "optional": [...]}, "output": [...], "output_name": [...]}}``. In-process they
come from :func:`object_info` over ``nodes.NODE_CLASS_MAPPINGS``; a running server gives the same at ``/object_info``.

Usage: ``python -m tools.workflows_tool check`` (structure, link and layout checks of every file in workflows/, no
ComfyUI).
"""

from __future__ import annotations

import json
from pathlib import Path

from training.cli import ArgumentParser, run

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"
API_DIR = WORKFLOWS / "api"
# Frontend-only nodes: never sent to the server, so they have no API twin.
VIRTUAL_TYPES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
SEED_NAMES = {"seed", "noise_seed"}  # the frontend adds control_after_generate to these even without the flag
ANY_TYPE = "*"  # an input that takes any output type (Preview Any's source)
# Widgets the frontend adds on its own and sends in the prompt (ComfyUI drops inputs a node does not declare):
# Preview Any's read-only text box.
FRONTEND_WIDGETS = {"PreviewAny": {"preview": ""}}
# LiteGraph's geometry in ComfyUI's frontend: the title bar is drawn ABOVE a node's pos; the body holds one row per
# socket (the longer of inputs and outputs) and one per widget (20 px + 4 spacing, +8 below the last), +6 margin.
# This reproduces the frontend's own sizes (KSampler 315x262, CheckpointLoaderSimple 315x98, VAEDecode 315x46).
TITLE_H, SLOT_H, WIDGET_H, NODE_W = 30, 20, 24, 315
# Nodes whose body holds more than rows (a text box, an image preview: the frontend's default sizes), and loaders
# wide enough to show a whole model file name.
MIN_SIZES = {
    **dict.fromkeys(
        ["CheckpointLoaderSimple", "PeRFlowDeltaLoader", "LoraLoader", "UNETLoader", "CLIPLoader", "VAELoader"],
        (400, 0),
    ),
    "ControlNetLoader": (400, 0),
    "CLIPTextEncode": (400, 200),
    "SaveImage": (315, 290),
    "PreviewImage": (315, 290),
    "LoadImage": (315, 330),
    "PreviewAny": (400, 130),
}


def object_info(node_class_mappings: dict, class_types) -> dict:
    """The /object_info fields this module needs, computed from node classes (as server.node_info does)."""
    out = {}
    for ct in class_types:
        cls = node_class_mappings[ct]
        inputs = cls.INPUT_TYPES()
        out[ct] = {
            "input": inputs,
            "input_order": {k: list(inputs.get(k, {}).keys()) for k in ("required", "optional")},
            "output": list(cls.RETURN_TYPES),
            "output_name": list(getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES),
        }
    return out


def _spec(info: dict, name: str):
    for group in ("required", "optional"):
        if name in info["input"].get(group, {}):
            return info["input"][group][name]
    raise KeyError(name)


def is_widget(spec) -> bool:
    """True when the frontend draws this input as a widget (a value in widgets_values), not a socket."""
    kind = spec[0]
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if opts.get("forceInput"):
        return False
    return isinstance(kind, (list, tuple)) or str(kind) in WIDGET_TYPES


def widget_layout(info: dict) -> list[tuple[str, str]]:
    """widgets_values positions as (input name, role): role 'value', or 'control' / 'upload' for the extra entries
    the frontend inserts after a seed (control_after_generate) and after an image_upload combo."""
    layout = []
    for group in ("required", "optional"):
        for name in info["input_order"].get(group, []):
            spec = _spec(info, name)
            if not is_widget(spec):
                continue
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            layout.append((name, "value"))
            if str(spec[0]) == "INT" and (opts.get("control_after_generate") or name in SEED_NAMES):
                layout.append((name, "control"))
            if opts.get("image_upload"):
                layout.append((name, "upload"))
    return layout


def socket_inputs(info: dict) -> list[tuple[str, str, bool]]:
    """(name, type, optional) of the inputs drawn as sockets, in input_order."""
    out = []
    for group in ("required", "optional"):
        for name in info["input_order"].get(group, []):
            spec = _spec(info, name)
            if not is_widget(spec):
                out.append((name, str(spec[0]), group == "optional"))
    return out


# The graph canvas of a 1920x1080 browser window (frontend 1.27: 1856x1002 px, less the side tool bar and the top
# menu; the bottom 80 px hold the canvas info text at the left), and the zoom range a shipped workflow may open at:
# below 0.6 LiteGraph draws nodes in low quality, without widget text.
VIEW = (1840, 920)
MIN_ZOOM, MAX_ZOOM = 0.6, 1.0
# The bottom-right of that canvas is covered by the frontend's minimap and canvas menu (from x, y onwards), and the
# pack badge (the node's source) sits BADGE_H above a title bar: keep nodes clear of both.
COVERED = (1530, 730)
BADGE_H = 20


def view_for(extent) -> dict:
    """extra.ds (the view a workflow opens at) that shows a graph spanning [0, w] x [0, h] whole."""
    scale = min(MAX_ZOOM, VIEW[0] / extent[0], VIEW[1] / extent[1])
    if scale < MIN_ZOOM:
        raise ValueError(
            f"a graph of {extent[0]}x{extent[1]} does not fit {VIEW} at zoom {MIN_ZOOM}: lay it out smaller"
        )
    return {"scale": int(scale * 100) / 100, "offset": [0, 0]}


def view_problems(ui: dict) -> list[str]:
    """What a user would not see when the frontend opens `ui` at its saved view in a 1920x1080 window: nodes
    outside the canvas or under the minimap, nodes (with title bar and badge) overlapping, a Note not top-left."""
    scale, (ox, oy) = ui["extra"]["ds"]["scale"], ui["extra"]["ds"]["offset"]
    errs = [] if MIN_ZOOM <= scale <= MAX_ZOOM else [f"zoom {scale} outside [{MIN_ZOOM}, {MAX_ZOOM}]"]
    rects = {}
    for n in ui["nodes"]:
        (x, y), (w, h) = n["pos"], n["size"]
        x0, y0 = (x + ox) * scale, (y - TITLE_H + oy) * scale
        rects[n["id"]] = (n, (x0, y0, x0 + w * scale, y0 + (h + TITLE_H) * scale))
    for nid, (n, (x0, y0, x1, y1)) in rects.items():
        label = f"node {nid} ({n.get('title') or n['type']})"
        if x0 < 0 or y0 < 0 or x1 > VIEW[0] or y1 > VIEW[1]:
            errs.append(f"{label} is outside the {VIEW[0]}x{VIEW[1]} view")
        if x1 > COVERED[0] and y1 > COVERED[1]:
            errs.append(f"{label} reaches under the minimap")
        for mid, (m, (a0, b0, a1, b1)) in rects.items():
            if mid > nid and x0 < a1 and a0 < x1 and y0 - BADGE_H * scale < b1 and b0 - BADGE_H * scale < y1:
                errs.append(f"{label} overlaps node {mid} ({m.get('title') or m['type']})")
    notes = [r for n, r in rects.values() if n["type"] in ("Note", "MarkdownNote")]
    if not notes or any(r[0] < notes[0][0] or r[1] < notes[0][1] for _, r in rects.values()):
        errs.append("the Note is not the top-left node")
    return errs


def node_size(class_type: str, info: dict, title: str = "") -> list[int]:
    """[width, height] of a node's body as the frontend draws it (the title bar sits above, TITLE_H high). A long
    title widens the node: the frontend makes room for it (about 6.5 px a character at its 14 px font, + 40)."""
    widgets, rows = len(widget_layout(info)), max(len(socket_inputs(info)), len(info["output"]), 1)
    height = SLOT_H * rows + (WIDGET_H * widgets + 8 if widgets else 0) + 6
    min_w, min_h = MIN_SIZES.get(class_type, (NODE_W, 0))
    return [max(NODE_W, min_w, 7 * len(title) + 40), max(height, min_h)]


def real_nodes(ui: dict) -> list[dict]:
    """Nodes that execute: not frontend-only, not muted (2) or bypassed (4)."""
    return [n for n in ui["nodes"] if n["type"] not in VIRTUAL_TYPES and n.get("mode", 0) == 0]


def link_problems(ui: dict) -> list[str]:
    """Graph consistency: every link id is unique and known, and nodes and the link table agree on both ends."""
    errs = []
    nodes = {n["id"]: n for n in ui["nodes"]}
    if len(nodes) != len(ui["nodes"]):
        errs.append("duplicate node ids")
    links = {}
    for link in ui["links"]:
        if len(link) != 6:
            errs.append(f"link {link!r}: expected [id, src, src_slot, dst, dst_slot, type]")
            continue
        if link[0] in links:
            errs.append(f"duplicate link id {link[0]}")
        links[link[0]] = link
    if ui.get("last_link_id", 0) < max(links, default=0):
        errs.append("last_link_id is below the highest link id")
    if ui.get("last_node_id", 0) < max(nodes, default=0):
        errs.append("last_node_id is below the highest node id")
    for lid, (_, src, sslot, dst, dslot, typ) in links.items():
        if src not in nodes or dst not in nodes:
            errs.append(f"link {lid}: dangling node {src if src not in nodes else dst}")
            continue
        outs, ins = nodes[src].get("outputs", []), nodes[dst].get("inputs", [])
        if sslot >= len(outs) or lid not in (outs[sslot].get("links") or []):
            errs.append(f"link {lid}: not listed on output {sslot} of node {src}")
        elif outs[sslot]["type"] != typ:
            errs.append(f"link {lid}: type {typ} but output {sslot} of node {src} is {outs[sslot]['type']}")
        if dslot >= len(ins) or ins[dslot].get("link") != lid:
            errs.append(f"link {lid}: not the link of input {dslot} of node {dst}")
        elif ins[dslot]["type"] not in (typ, ANY_TYPE):
            errs.append(f"link {lid}: type {typ} but input {dslot} of node {dst} is {ins[dslot]['type']}")
    for n in ui["nodes"]:
        for i, inp in enumerate(n.get("inputs", [])):
            if inp.get("link") is not None and inp["link"] not in links:
                errs.append(f"node {n['id']} input {i} ({inp['name']}): dangling link {inp['link']}")
        for o, out in enumerate(n.get("outputs", [])):
            for lid in out.get("links") or []:
                if lid not in links:
                    errs.append(f"node {n['id']} output {o}: dangling link {lid}")
    return errs


def ui_to_api(ui: dict, schema: dict) -> dict:
    """Convert a UI graph to an API prompt the way the frontend's graphToPrompt does for plain graphs."""
    links = {link[0]: link for link in ui["links"]}
    prompt = {}
    for n in real_nodes(ui):
        info = schema[n["type"]]
        inputs = {}
        values = list(n.get("widgets_values") or [])
        layout = widget_layout(info)
        if len(values) != len(layout):
            raise ValueError(
                f"node {n['id']} ({n['type']}): {len(values)} widgets_values for {len(layout)} widget slots "
                f"{[name + ('' if role == 'value' else ':' + role) for name, role in layout]}"
            )
        for (name, role), value in zip(layout, values, strict=True):
            if role == "value":
                inputs[name] = value
        for inp in n.get("inputs", []):
            if inp.get("link") is not None:
                _, src, sslot, *_ = links[inp["link"]]
                inputs[inp["name"]] = [str(src), sslot]
        inputs.update(FRONTEND_WIDGETS.get(n["type"], {}))
        entry = {"inputs": inputs, "class_type": n["type"]}
        entry["_meta"] = {"title": n.get("title") or n["type"]}
        prompt[str(n["id"])] = entry
    return prompt


def compare(ui: dict, api: dict, schema: dict) -> list[str]:
    """Differences between a UI graph and its API twin: node ids and class types, links, widget values."""
    try:
        got = ui_to_api(ui, schema)
    except (KeyError, ValueError) as e:
        return [f"cannot convert the UI graph: {e}"]
    errs = []
    for nid in sorted(set(got) | set(api), key=lambda s: int(s) if s.isdigit() else s):
        if nid not in api:
            errs.append(f"node {nid} ({got[nid]['class_type']}) is missing from the API file")
            continue
        if nid not in got:
            errs.append(f"node {nid} ({api[nid]['class_type']}) is missing from the UI file")
            continue
        a, b = got[nid], api[nid]
        if a["class_type"] != b["class_type"]:
            errs.append(f"node {nid}: class {a['class_type']} (UI) != {b['class_type']} (API)")
            continue
        for name in sorted(set(a["inputs"]) | set(b["inputs"])):
            va, vb = a["inputs"].get(name, "<absent>"), b["inputs"].get(name, "<absent>")
            if va != vb:
                errs.append(f"node {nid} ({a['class_type']}) input {name}: UI {va!r} != API {vb!r}")
    return errs


def api_to_ui(api: dict, schema: dict, extra_nodes=(), layout: dict | None = None, properties=None) -> dict:
    """Build a UI graph from an API prompt (used to author the shipped pairs).

    extra_nodes: frontend-only nodes (e.g. Note) given as complete UI node dicts. layout: {node_id: (x, y)}; sizes
    come from node_size. properties: {node_id: extra properties}. Seeds get control value 'fixed' unless
    api[...]['_control'] says so.
    """
    layout = layout or {}
    properties = properties or {}
    nodes, links = [], []
    out_links: dict[tuple[str, int], list[int]] = {}
    for nid, entry in api.items():
        info = schema[entry["class_type"]]
        for name, _typ, _opt in socket_inputs(info):
            v = entry["inputs"].get(name)
            if isinstance(v, list):
                src, slot = v
                lid = len(links) + 1
                links.append([lid, int(src), slot, int(nid), None, schema[api[src]["class_type"]]["output"][slot]])
                out_links.setdefault((src, slot), []).append(lid)
    lid_iter = iter(links)
    for order, (nid, entry) in enumerate(api.items()):
        info = schema[entry["class_type"]]
        inputs = []
        for slot, (name, typ, opt) in enumerate(socket_inputs(info)):
            v = entry["inputs"].get(name)
            if isinstance(v, list):
                link = next(lid_iter)
                link[4] = slot
                inputs.append({"name": name, "type": typ, "link": link[0]})
            elif not opt:
                raise ValueError(f"node {nid} ({entry['class_type']}): required socket {name} is not connected")
            else:
                inputs.append({"name": name, "type": typ, "link": None})
        outputs = []
        for slot, (typ, oname) in enumerate(zip(info["output"], info["output_name"], strict=True)):
            outputs.append({"name": oname, "type": typ, "links": out_links.get((nid, slot), []), "slot_index": slot})
        values = []
        for name, role in widget_layout(info):
            if role == "value":
                values.append(entry["inputs"][name])
            elif role == "control":
                values.append(entry.get("_control", "fixed"))
            else:
                values.append("image")
        props = {"Node name for S&R": entry["class_type"], **properties.get(nid, {})}
        node = {
            "id": int(nid),
            "type": entry["class_type"],
            "pos": list(layout.get(nid, (100 + 350 * order, 100))),
            "size": node_size(entry["class_type"], info, entry.get("_meta", {}).get("title", "")),
            "flags": {},
            "order": order,
            "mode": 0,
            "inputs": inputs,
            "outputs": outputs,
            "properties": props,
            "widgets_values": values,
        }
        title = entry.get("_meta", {}).get("title")
        if title and title != entry["class_type"]:
            node["title"] = title
        nodes.append(node)
    for k, extra in enumerate(extra_nodes):
        nodes.append({**extra, "order": len(api) + k})
    return {
        "last_node_id": max(n["id"] for n in nodes),
        "last_link_id": len(links),
        "nodes": nodes,
        "links": links,
        "groups": [],
        "config": {},
        "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}},
        "version": 0.4,
    }


def pairs(folder: Path = WORKFLOWS) -> tuple[list[tuple[Path, Path]], list[str]]:
    """(UI file, API twin) pairs, and problems: a UI file without a twin or a twin without a UI file."""
    ui_files = sorted(folder.glob("*.json"))
    api_files = sorted((folder / "api").glob("*.json"))
    api_names = {p.name for p in api_files}
    ui_names = {p.name for p in ui_files}
    problems = [f"{p.name}: no API twin in api/" for p in ui_files if p.name not in api_names]
    problems += [f"api/{p.name}: no UI file" for p in api_files if p.name not in ui_names]
    return [(p, folder / "api" / p.name) for p in ui_files if p.name in api_names], problems


def api_link_problems(api: dict) -> list[str]:
    """API prompt links must point at existing nodes."""
    errs = []
    for nid, entry in api.items():
        for name, v in entry.get("inputs", {}).items():
            if isinstance(v, list) and (len(v) != 2 or str(v[0]) not in api):
                errs.append(f"node {nid} input {name}: dangling link {v!r}")
    return errs


def main() -> None:
    parser = ArgumentParser(
        description="Check the structure, links and layout of every file in workflows/ (no ComfyUI)."
    )
    parser.add_argument("command", choices=["check"])
    parser.parse_args()
    found, problems = pairs()
    for ui_path, api_path in found:
        ui, api = json.loads(ui_path.read_text()), json.loads(api_path.read_text())
        problems += [f"{ui_path.name}: {e}" for e in link_problems(ui) + view_problems(ui)]
        problems += [f"api/{api_path.name}: {e}" for e in api_link_problems(api)]
        ui_ids = {str(n["id"]) for n in real_nodes(ui)}
        if ui_ids != set(api):
            problems.append(f"{ui_path.name}: node ids differ from the API twin: {sorted(ui_ids ^ set(api))}")
    print("\n".join(problems) or f"{len(found)} workflow pairs OK")
    if problems:
        raise SystemExit(1)


if __name__ == "__main__":
    run(main)
