"""Write the example workflows: workflows/<name>.json (UI graph) and workflows/api/<name>.json (API prompt).

Run from the repository root with ComfyUI's Python, so that widget order comes from the real node definitions:
    COMFYUI_PATH=/path/to/ComfyUI /path/to/ComfyUI/venv/bin/python -m tools.build_workflows
Each workflow is written once in API form below; the UI graph is derived from it with workflows_tool.api_to_ui.
A recipe places nodes on a grid by hint (x: column, y: order within the column; only the order matters); layout()
turns that into positions from the real node sizes, with the Note top-left, and picks the zoom the file opens at.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
from pathlib import Path

from tools.workflows_tool import (
    API_DIR,
    FRONTEND_WIDGETS,
    TITLE_H,
    VIEW,
    WORKFLOWS,
    api_to_ui,
    node_size,
    object_info,
    view_for,
    view_problems,
)
from training.cli import ArgumentParser, run

REPO = Path(__file__).resolve().parents[1]

HF = "https://huggingface.co"
PERFLOW_LICENCE = "CC-BY-NC-4.0 (PeRFlow weights: non-commercial use only)"


class Model:
    def __init__(self, directory, name, url, licence, hint=""):
        self.directory, self.name, self.url, self.licence, self.hint = directory, name, url, licence, hint

    def prop(self):
        return {"name": self.name, "url": self.url, "directory": self.directory}

    def note(self):
        hint = f"\n    note: {self.hint}" if self.hint else ""
        return f"- models/{self.directory}/{self.name}\n    {self.url}\n    licence: {self.licence}{hint}"


SD15 = Model(
    "checkpoints",
    "v1-5-pruned-emaonly-fp16.safetensors",
    f"{HF}/Comfy-Org/stable-diffusion-v1-5-archive/resolve/main/v1-5-pruned-emaonly-fp16.safetensors",
    "CreativeML OpenRAIL-M",
    "any SD1.5 checkpoint works; pick yours in the loader",
)
SD15_DELTA = Model(
    "perflow",
    "perflow-sd15-delta-v0-1.safetensors",
    f"{HF}/hansyan/perflow-sd15-delta-weights/resolve/main/diffusion_pytorch_model.v0-1.safetensors",
    PERFLOW_LICENCE,
    "the published dW for SD1.5 (diffusers format, variant v0-1, 1.72 GB); save it under this name",
)
DREAMSHAPER8 = Model(
    "checkpoints",
    "DreamShaper_8_pruned.safetensors",
    f"{HF}/Lykon/DreamShaper/resolve/main/DreamShaper_8_pruned.safetensors",
    "CreativeML OpenRAIL-M",
    "any SD1.5 fine-tune works the same way",
)
PIXEL_LORA = Model(
    "loras",
    "PixelArtRedmond15V-PixelArt-PIXARFK.safetensors",
    f"{HF}/artificialguybr/pixelartredmond-1-5v-pixel-art-loras-for-sd-1-5/resolve/main/"
    "PixelArtRedmond15V-PixelArt-PIXARFK.safetensors",
    "bespoke-lora-trained-license (read the model card before commercial use)",
    "trigger words: pixel art, PixArFK",
)
TILE = Model(
    "controlnet",
    "control_v11f1e_sd15_tile_fp16.safetensors",
    f"{HF}/comfyanonymous/ControlNet-v1-1_fp16_safetensors/resolve/main/control_v11f1e_sd15_tile_fp16.safetensors",
    "OpenRAIL (ControlNet 1.1, lllyasviel)",
)
SDXL_BASE = Model(
    "checkpoints",
    "sd_xl_base_1.0.safetensors",
    f"{HF}/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/sd_xl_base_1.0.safetensors",
    "CreativeML Open RAIL++-M",
    "used for its text encoders and VAE only; PeRFlow retrained just the UNet",
)
SDXL_UNET = Model(
    "diffusion_models",
    "perflow-sdxl-base-unet.safetensors",
    f"{HF}/hansyan/perflow-sdxl-base/resolve/main/unet/diffusion_pytorch_model.v0-fix.safetensors",
    PERFLOW_LICENCE + "; derived from SDXL base (CreativeML Open RAIL++-M)",
    "the merged PeRFlow SDXL UNet (diffusers format, variant v0-fix); save it under this name",
)
SD21_UNET = Model(
    "diffusion_models",
    "perflow-sd21-artius-unet.safetensors",
    f"{HF}/hansyan/perflow-sd21-artius/resolve/main/unet/diffusion_pytorch_model.safetensors",
    PERFLOW_LICENCE + "; derived from an SD2.1 fine-tune (SD2.1: CreativeML Open RAIL++-M)",
    "the merged PeRFlow SD2.1 UNet (diffusers format, 1.73 GB); save it under this name",
)
SD21_CLIP = Model(
    "text_encoders",
    "perflow-sd21-artius-text-encoder.safetensors",
    f"{HF}/hansyan/perflow-sd21-artius/resolve/main/text_encoder/model.safetensors",
    "same repository and terms as the UNet",
    "the pipeline's OpenCLIP-H text encoder; save it under this name",
)
SD21_VAE = Model(
    "vae",
    "perflow-sd21-artius-vae.safetensors",
    f"{HF}/hansyan/perflow-sd21-artius/resolve/main/vae/diffusion_pytorch_model.safetensors",
    "same repository and terms as the UNet",
    "the pipeline's VAE; save it under this name",
)

POSITIVE = (
    "RAW photo, 8k uhd, dslr, high quality, film grain, highly detailed, masterpiece; "
    "a colorful bird standing on a tree branch, open beak"
)
NEGATIVE = "distorted, blur, smooth, low-quality, warm, haze, over-saturated, high-contrast, out of focus, dark"
SEED = 1024


class Graph:
    """A workflow in API form plus positions and model properties for its UI twin."""

    def __init__(self, name, title, about):
        self.name, self.title, self.about = name, title, about
        self.api, self.pos, self.props, self.models = {}, {}, {}, []

    def add(self, class_type, pos, title=None, dl=None, **inputs):
        """Add a node; dl: the Model it loads (for the Note and the missing-model dialog)."""
        nid = str(len(self.api) + 1)
        entry = {
            "inputs": {k: ([v[0], v[1]] if isinstance(v, tuple) else v) for k, v in inputs.items()},
            "class_type": class_type,
            "_meta": {"title": title or class_type},
        }
        self.api[nid] = entry
        self.pos[nid] = pos
        ms = [dl] if dl else []
        if ms:
            self.props[nid] = {"models": [m.prop() for m in ms]}
            self.models += [m for m in ms if m not in self.models]
        return nid

    def note_text(self):
        lines = [self.title, "", self.about, "", "Models: download each file and put it at the path shown", ""]
        lines += [m.note() for m in self.models]
        lines += [
            "",
            "PeRFlow: https://github.com/magic-research/piecewise-rectified-flow (Yan et al. 2024). "
            "The published PeRFlow weights are CC-BY-NC-4.0: no commercial use. "
            "Base models keep their own licences (above).",
        ]
        return "\n".join(lines)


def sd15_text(g, clip, x=420, y=60):
    pos = g.add("CLIPTextEncode", (x, y), "Positive prompt", text=POSITIVE, clip=(clip, 1))
    neg = g.add("CLIPTextEncode", (x, y + 230), "Negative prompt", text=NEGATIVE, clip=(clip, 1))
    return pos, neg


def perflow_ksampler(g, model, positive, negative, latent, steps, cfg, denoise):
    """The stock KSampler with sampler and scheduler 'perflow' and the shared seed."""
    return g.add(
        "KSampler", (850, 60), seed=SEED, steps=steps, cfg=cfg, sampler_name="perflow", scheduler="perflow",
        denoise=denoise, model=model, positive=positive, negative=negative, latent_image=latent,
    )  # fmt: skip


def sd15_delta(g, model, pos):
    """PeRFlow Delta Loader with the published SD1.5 delta at strength 1, settings read from the file, and its
    summary shown by a Preview Any node right below it."""
    delta = g.add(
        "PeRFlowDeltaLoader", pos, dl=SD15_DELTA, delta_name=SD15_DELTA.name, strength=1.0, parameterization="auto",
        num_windows=0, model=model,
    )  # fmt: skip
    g.add("PreviewAny", (pos[0], pos[1] + 1), "PeRFlow summary", source=(delta, 1), **FRONTEND_WIDGETS["PreviewAny"])
    return delta


def decode_save(g, latent, vae, prefix, x=1270):
    img = g.add("VAEDecode", (x, 60), samples=(latent, 0), vae=(vae, 2))
    g.add("SaveImage", (x, 180), filename_prefix=prefix, images=(img, 0))


def sd15_delta_t2i(steps):
    g = Graph(
        f"sd15_delta_t2i_{steps}step",
        f"PeRFlow SD1.5 text-to-image, {steps} steps",
        "Stock SD1.5 checkpoint + the published PeRFlow delta (dW), applied by PeRFlow Delta Loader. KSampler uses "
        f"sampler 'perflow' and scheduler 'perflow', {steps} steps, cfg 4.5, 512x512. "
        + ("4 steps is the published default. " if steps == 4 else "8 steps gives finer detail than 4. ")
        + "Swap in any SD1.5 fine-tune in the checkpoint loader.",
    )
    ckpt = g.add("CheckpointLoaderSimple", (40, 200), dl=SD15, ckpt_name=SD15.name)
    delta = sd15_delta(g, (ckpt, 0), (420, 540))
    pos, neg = sd15_text(g, ckpt)
    lat = g.add("EmptyLatentImage", (420, 760), width=512, height=512, batch_size=1)
    ks = perflow_ksampler(g, (delta, 0), (pos, 0), (neg, 0), (lat, 0), steps=steps, cfg=4.5, denoise=1.0)
    decode_save(g, ks, ckpt, f"perflow/sd15_{steps}step")
    return g


def sd15_finetune_lora():
    g = Graph(
        "sd15_finetune_lora_perflow",
        "PeRFlow on an SD1.5 fine-tune + style LoRA, 4 steps",
        "DreamShaper 8 + a pixel-art style LoRA (LoraLoader) + the PeRFlow SD1.5 delta. The same dW accelerates any "
        "SD1.5 fine-tune; LoRAs stack as usual. 4 steps, cfg 4.5, 512x512.",
    )
    ckpt = g.add("CheckpointLoaderSimple", (40, 200), dl=DREAMSHAPER8, ckpt_name=DREAMSHAPER8.name)
    lora = g.add(
        "LoraLoader",
        (40, 420),
        dl=PIXEL_LORA,
        lora_name=PIXEL_LORA.name,
        strength_model=0.8,
        strength_clip=0.8,
        model=(ckpt, 0),
        clip=(ckpt, 1),
    )
    delta = sd15_delta(g, (lora, 0), (420, 540))
    pos = g.add(
        "CLIPTextEncode",
        (420, 60),
        "Positive prompt",
        text="pixel art, PixArFK, a cozy cottage in a snowy forest at night, warm windows, detailed",
        clip=(lora, 1),
    )
    neg = g.add("CLIPTextEncode", (420, 290), "Negative prompt", text=NEGATIVE, clip=(lora, 1))
    lat = g.add("EmptyLatentImage", (420, 760), width=512, height=512, batch_size=1)
    ks = perflow_ksampler(g, (delta, 0), (pos, 0), (neg, 0), (lat, 0), steps=4, cfg=4.5, denoise=1.0)
    decode_save(g, ks, ckpt, "perflow/sd15_dreamshaper_lora")
    return g


def sdxl_merged():
    g = Graph(
        "sdxl_merged_ddim_eps_6step",
        "PeRFlow SDXL (merged model), ddim_eps, 6 steps",
        "The published PeRFlow SDXL UNet (Load Diffusion Model) with the SDXL base checkpoint's text encoders and "
        "VAE. PeRFlow Model Sampling sets parameterization ddim_eps and 4 windows. 6 steps, cfg 2.0, 1024x1024. "
        "If you converted the whole PeRFlow pipeline to one checkpoint file, load it with the checkpoint loader "
        "and connect its MODEL to PeRFlow Model Sampling instead.",
    )
    ckpt = g.add("CheckpointLoaderSimple", (40, 300), "SDXL base (text encoders + VAE)", dl=SDXL_BASE,
                 ckpt_name=SDXL_BASE.name)  # fmt: skip
    unet = g.add("UNETLoader", (40, 60), "PeRFlow SDXL UNet", dl=SDXL_UNET, unet_name=SDXL_UNET.name,
                 weight_dtype="default")  # fmt: skip
    ms = g.add("PeRFlowModelSampling", (420, 540), parameterization="ddim_eps", num_windows=4, model=(unet, 0))
    pos, neg = sd15_text(g, ckpt)
    lat = g.add("EmptyLatentImage", (420, 760), width=1024, height=1024, batch_size=1)
    ks = perflow_ksampler(g, (ms, 0), (pos, 0), (neg, 0), (lat, 0), steps=6, cfg=2.0, denoise=1.0)
    decode_save(g, ks, ckpt, "perflow/sdxl_6step")
    return g


def sd21_merged():
    g = Graph(
        "sd21_merged_velocity_8step",
        "PeRFlow SD2.1 (merged model), velocity, 8 steps",
        "The published PeRFlow SD2.1 pipeline (perflow-sd21-artius): its UNet, text encoder and VAE loaded from "
        "the diffusers files as published. PeRFlow Model Sampling sets parameterization velocity and 4 windows. "
        "8 steps, cfg 7.5, 768x768.",
    )
    unet = g.add("UNETLoader", (40, 60), "PeRFlow SD2.1 UNet", dl=SD21_UNET, unet_name=SD21_UNET.name,
                 weight_dtype="default")  # fmt: skip
    clip = g.add("CLIPLoader", (40, 220), dl=SD21_CLIP, clip_name=SD21_CLIP.name, type="stable_diffusion",
                 device="default")  # fmt: skip
    vae = g.add("VAELoader", (40, 400), dl=SD21_VAE, vae_name=SD21_VAE.name)
    ms = g.add("PeRFlowModelSampling", (420, 540), parameterization="velocity", num_windows=4, model=(unet, 0))
    pos = g.add("CLIPTextEncode", (420, 60), "Positive prompt", text=POSITIVE, clip=(clip, 0))
    neg = g.add("CLIPTextEncode", (420, 290), "Negative prompt", text=NEGATIVE, clip=(clip, 0))
    lat = g.add("EmptyLatentImage", (420, 760), width=768, height=768, batch_size=1)
    ks = perflow_ksampler(g, (ms, 0), (pos, 0), (neg, 0), (lat, 0), steps=8, cfg=7.5, denoise=1.0)
    img = g.add("VAEDecode", (1270, 60), samples=(ks, 0), vae=(vae, 0))
    g.add("SaveImage", (1270, 180), filename_prefix="perflow/sd21_8step", images=(img, 0))
    return g


def sd15_img2img_tile():
    g = Graph(
        "sd15_img2img_controlnet_tile",
        "PeRFlow SD1.5 img2img refine with ControlNet tile, denoise 0.5",
        "PeRFlow-Refiner: load an image, scale it to about 1 megapixel, encode it, and re-sample at denoise 0.5 "
        "with ControlNet tile holding the layout. 4 steps, cfg 4.5. Upload your own image in Load Image.",
    )
    ckpt = g.add("CheckpointLoaderSimple", (40, 200), dl=SD15, ckpt_name=SD15.name)
    delta = sd15_delta(g, (ckpt, 0), (40, 380))
    load = g.add("LoadImage", (420, 60), image="example.png")
    scaled = g.add("ImageScaleToTotalPixels", (420, 400), upscale_method="lanczos", megapixels=1.0, image=(load, 0))
    enc = g.add("VAEEncode", (420, 500), pixels=(scaled, 0), vae=(ckpt, 2))
    cn = g.add("ControlNetLoader", (420, 600), dl=TILE, control_net_name=TILE.name)
    pos, neg = sd15_text(g, ckpt, x=640)
    apply = g.add(
        "ControlNetApplyAdvanced",
        (640, 520),
        strength=1.0,
        start_percent=0.0,
        end_percent=1.0,
        positive=(pos, 0),
        negative=(neg, 0),
        control_net=(cn, 0),
        image=(scaled, 0),
        vae=(ckpt, 2),
    )
    ks = perflow_ksampler(g, (delta, 0), (apply, 0), (apply, 1), (enc, 0), steps=4, cfg=4.5, denoise=0.5)
    decode_save(g, ks, ckpt, "perflow/sd15_refine_tile")
    return g


def sd15_cfg_schedule():
    g = Graph(
        "sd15_cfg_schedule",
        "PeRFlow SD1.5 with a per-window CFG schedule (7,1,1,1)",
        "PeRFlow CFG Schedule sets guidance per time window and replaces KSampler's cfg: 7 in the first (noisiest) "
        "window, 1 afterwards. Windows at exactly 1.0 skip the unconditional pass, so 4 steps cost 5 UNet "
        "evaluations instead of 8. Try mode 'ramp' for a linear ramp from ramp_start to ramp_end.",
    )
    ckpt = g.add("CheckpointLoaderSimple", (40, 200), dl=SD15, ckpt_name=SD15.name)
    delta = sd15_delta(g, (ckpt, 0), (40, 380))
    sched = g.add(
        "PeRFlowCFGSchedule",
        (420, 540),
        mode="list",
        cfg_list="7,1,1,1",
        ramp_start=7.0,
        ramp_end=1.0,
        model=(delta, 0),
    )
    pos, neg = sd15_text(g, ckpt)
    lat = g.add("EmptyLatentImage", (420, 800), width=512, height=512, batch_size=1)
    ks = perflow_ksampler(g, (sched, 0), (pos, 0), (neg, 0), (lat, 0), steps=4, cfg=7.0, denoise=1.0)
    decode_save(g, ks, ckpt, "perflow/sd15_cfg_schedule")
    return g


def sd15_custom_advanced():
    g = Graph(
        "sd15_sampler_custom_advanced",
        "PeRFlow SD1.5 with SamplerCustomAdvanced, 4 steps",
        "The same sampling as the KSampler examples, built from parts: RandomNoise, CFGGuider (cfg 4.5), "
        "PeRFlow Sampler and PeRFlow Scheduler (4 steps) into SamplerCustomAdvanced.",
    )
    ckpt = g.add("CheckpointLoaderSimple", (40, 200), dl=SD15, ckpt_name=SD15.name)
    delta = sd15_delta(g, (ckpt, 0), (40, 380))
    pos, neg = sd15_text(g, ckpt)
    noise = g.add("RandomNoise", (850, 60), noise_seed=SEED)
    guider = g.add("CFGGuider", (850, 180), cfg=4.5, model=(delta, 0), positive=(pos, 0), negative=(neg, 0))
    sampler = g.add("PeRFlowSampler", (850, 330))
    sigmas = g.add("PeRFlowScheduler", (850, 410), steps=4, denoise=1.0, model=(delta, 0))
    lat = g.add("EmptyLatentImage", (420, 540), width=512, height=512, batch_size=1)
    out = g.add(
        "SamplerCustomAdvanced",
        (1270, 60),
        noise=(noise, 0),
        guider=(guider, 0),
        sampler=(sampler, 0),
        sigmas=(sigmas, 0),
        latent_image=(lat, 0),
    )
    img = g.add("VAEDecode", (1650, 60), samples=(out, 0), vae=(ckpt, 2))
    g.add("SaveImage", (1650, 180), filename_prefix="perflow/sd15_custom_advanced", images=(img, 0))
    return g


BUILDERS = [
    lambda: sd15_delta_t2i(4),
    lambda: sd15_delta_t2i(8),
    sd15_finetune_lora,
    sdxl_merged,
    sd21_merged,
    sd15_img2img_tile,
    sd15_cfg_schedule,
    sd15_custom_advanced,
]


def load_schema(class_types):
    """object_info for class_types from an in-process ComfyUI at $COMFYUI_PATH, with this pack loaded."""
    if not os.environ.get("COMFYUI_PATH"):
        raise ValueError("COMFYUI_PATH is not set: point it at a ComfyUI checkout and run this with its Python")
    comfy = Path(os.environ["COMFYUI_PATH"]).resolve()
    if not (comfy / "nodes.py").is_file():
        raise ValueError(f"COMFYUI_PATH={comfy} is not a ComfyUI checkout (no nodes.py)")
    sys.path.insert(0, str(comfy))  # ComfyUI is not a package: its modules are imported from its root
    from comfy.cli_args import args

    args.cpu = True
    import folder_paths
    import utils.install_util  # noqa: F401  (as main.py: before nodes.py shadows utils/ with comfy/utils.py)

    import nodes

    parent = Path(tempfile.mkdtemp(prefix="perflow_custom_nodes_"))
    (parent / "ComfyUI-PeRFlow").symlink_to(REPO)
    if os.environ.get("ANIMATEDIFF_PATH"):  # the AnimateDiff workflow's ADE_* nodes
        (parent / "ComfyUI-AnimateDiff-Evolved").symlink_to(Path(os.environ["ANIMATEDIFF_PATH"]).resolve())
    folder_paths.add_model_folder_path("custom_nodes", str(parent))
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    known = [c for c in class_types if c in nodes.NODE_CLASS_MAPPINGS]
    schema = object_info(nodes.NODE_CLASS_MAPPINGS, known)
    missing = set(class_types) - set(schema)
    if missing:
        raise ValueError(f"node classes not found in this ComfyUI: {sorted(missing)} (update ComfyUI)")
    return schema


NOTE_W = 460  # the Note's width; its height follows from the text
GAP_X, GAP_Y, MARGIN = 50, 30, 20  # between columns, between a node and the next one's title bar, around it all


def note_size(text: str) -> list[int]:
    """[width, height] of a Note that shows `text` without scrolling (the frontend's 10 px textarea font)."""
    chars_per_line, line_h = (NOTE_W - 20) // 6, 13
    lines = sum(max(1, -(-len(line) // chars_per_line)) for line in text.split("\n"))
    return [NOTE_W, lines * line_h + 30]


def layout(g, schema, note: list[int]) -> tuple[dict, list[int], list[int]]:
    """({node id: (x, y)}, Note position, [width, height] of the whole graph) from the recipe's grid hints.

    Columns are the distinct hint x values, left to right; in a column, nodes follow their hint y. Each node's pos is
    its body's top-left: its title bar occupies the TITLE_H above it. The Note heads the first column.
    """
    columns: dict = {}
    for nid, (x, y) in g.pos.items():
        columns.setdefault(x, []).append((y, nid))
    pos, x = {}, MARGIN
    bottom = MARGIN + TITLE_H + note[1]
    for k, cx in enumerate(sorted(columns)):
        members = [nid for _, nid in sorted(columns[cx])]
        sizes = [
            node_size(e["class_type"], schema[e["class_type"]], e["_meta"]["title"]) for e in map(g.api.get, members)
        ]
        y = MARGIN + TITLE_H + (note[1] + GAP_Y + TITLE_H if k == 0 else 0)
        for nid, (_, h) in zip(members, sizes, strict=True):
            pos[nid] = (x, y)
            y += h + GAP_Y + TITLE_H
        bottom = max(bottom, y - GAP_Y - TITLE_H)
        x += max([w for w, _ in sizes] + ([note[0]] if k == 0 else [])) + GAP_X
    return pos, [MARGIN, MARGIN + TITLE_H], [x - GAP_X + MARGIN, bottom + MARGIN]


def note_node(g, nid, pos, size):
    return {
        "id": nid,
        "type": "Note",
        "title": "Models, licences and settings",
        "pos": pos,
        "size": size,
        "flags": {},
        "mode": 0,
        "inputs": [],
        "outputs": [],
        "properties": {},
        "widgets_values": [g.note_text()],
        "color": "#432",
        "bgcolor": "#653",
    }


def main():
    ArgumentParser(description=__doc__.split("\n")[0]).parse_args()
    graphs = [b() for b in BUILDERS]
    schema = load_schema(sorted({e["class_type"] for g in graphs for e in g.api.values()}))
    API_DIR.mkdir(parents=True, exist_ok=True)
    for g in graphs:
        note = note_size(g.note_text())
        pos, note_pos, extent = layout(g, schema, note)
        ui = api_to_ui(g.api, schema, [note_node(g, len(g.api) + 1, note_pos, note)], pos, g.props)
        ui["extra"]["ds"] = view_for(extent)
        problems = view_problems(ui)
        if problems:
            raise ValueError(f"{g.name}: {'; '.join(problems)}")
        ui["extra"]["info"] = {"name": g.title}
        ui["models"] = [m.prop() for m in g.models]
        (WORKFLOWS / f"{g.name}.json").write_text(json.dumps(ui, indent=2) + "\n")
        (API_DIR / f"{g.name}.json").write_text(json.dumps(g.api, indent=2) + "\n")
        print(f"wrote {g.name} ({extent[0]}x{extent[1]} at zoom {ui['extra']['ds']['scale']}; view {VIEW})")


# ---------------------------------------------------------------- AnimateDiff video and SDXL plug-and-play

MM_SD15_V2 = Model(
    "animatediff_models",
    "mm_sd_v15_v2.ckpt",
    f"{HF}/guoyww/animatediff/resolve/main/mm_sd_v15_v2.ckpt",
    "Apache-2.0 (AnimateDiff, guoyww)",
    "needs the AnimateDiff-Evolved node pack (Kosinkadink/ComfyUI-AnimateDiff-Evolved)",
)
SDXL_FINETUNE = Model(
    "checkpoints",
    SDXL_BASE.name,
    SDXL_BASE.url,
    SDXL_BASE.licence,
    "stands in for your SDXL fine-tune: pick any SDXL checkpoint in the loader",
)
SDXL_DELTA_NAME = "perflow-sdxl-delta.safetensors"


def sd15_animatediff():
    g = Graph(
        "sd15_animatediff_perflow",
        "PeRFlow SD1.5 + AnimateDiff video, 16 frames, 6 steps",
        "The PeRFlow SD1.5 delta (Delta Loader) + the AnimateDiff v2 motion module through AnimateDiff-Evolved's "
        "Gen2 nodes, with context options (16-frame windows, overlap 4: raise batch_size in Empty Latent Image "
        "for longer clips). 'Use Evolved Sampling' MUST keep beta_schedule 'use existing': its default "
        "'autoselect' swaps in AnimateDiff's own noise table and model sampling, which PeRFlow refuses with an "
        "error. KSampler: sampler and scheduler 'perflow', 6 steps (4-8 work), cfg 4.5, 512x512, saved as an "
        "animated WebP at 8 fps.",
    )
    ckpt = g.add("CheckpointLoaderSimple", (40, 200), dl=SD15, ckpt_name=SD15.name)
    delta = sd15_delta(g, (ckpt, 0), (40, 380))
    mm = g.add("ADE_LoadAnimateDiffModel", (420, 10), dl=MM_SD15_V2, model_name=MM_SD15_V2.name)
    apply = g.add("ADE_ApplyAnimateDiffModelSimple", (420, 20), motion_model=(mm, 0))
    ctx = g.add(
        "ADE_StandardUniformContextOptions", (420, 30), context_length=16, context_stride=1, context_overlap=4,
        fuse_method="pyramid", use_on_equal_length=False, start_percent=0.0, guarantee_steps=1,
    )  # fmt: skip
    evolved = g.add(
        "ADE_UseEvolvedSampling", (420, 40), "Use Evolved Sampling (beta_schedule: use existing)",
        beta_schedule="use existing", model=(delta, 0), m_models=(apply, 0), context_options=(ctx, 0),
    )  # fmt: skip
    pos, neg = sd15_text(g, ckpt, x=640)
    lat = g.add("EmptyLatentImage", (640, 760), width=512, height=512, batch_size=16)
    ks = perflow_ksampler(g, (evolved, 0), (pos, 0), (neg, 0), (lat, 0), steps=6, cfg=4.5, denoise=1.0)
    img = g.add("VAEDecode", (1270, 60), samples=(ks, 0), vae=(ckpt, 2))
    g.add(
        "SaveAnimatedWEBP", (1270, 180), filename_prefix="perflow/sd15_animatediff", fps=8.0, lossless=False,
        quality=90, method="default", images=(img, 0),
    )  # fmt: skip
    return g


def sdxl_extracted_delta():
    g = Graph(
        "sdxl_finetune_extracted_delta_6step",
        "PeRFlow on any SDXL fine-tune: extracted delta, ddim_eps, 6 steps",
        "Make the delta once from the published merged PeRFlow SDXL UNet and SDXL base (see README, SDXL "
        "plug-and-play):\n  python -m training.extract_delta --merged perflow-sdxl-base-unet.safetensors "
        f"--base sd_xl_base_1.0.safetensors --out ComfyUI/models/perflow/{SDXL_DELTA_NAME}\n"
        f"(the merged UNet: {SDXL_UNET.url}; licence {SDXL_UNET.licence}). The Delta Loader adds it to your SDXL "
        "fine-tune with parameterization ddim_eps and 4 windows. KSampler: 'perflow' sampler and scheduler, "
        "6 steps, cfg 2.0, 1024x1024.",
    )
    ckpt = g.add("CheckpointLoaderSimple", (40, 200), "SDXL fine-tune", dl=SDXL_FINETUNE, ckpt_name=SDXL_FINETUNE.name)
    delta = g.add(
        "PeRFlowDeltaLoader", (420, 540), "PeRFlow Delta Loader (extracted SDXL delta)", delta_name=SDXL_DELTA_NAME,
        strength=1.0, parameterization="ddim_eps", num_windows=4, model=(ckpt, 0),
    )  # fmt: skip
    g.add("PreviewAny", (420, 541), "PeRFlow summary", source=(delta, 1), **FRONTEND_WIDGETS["PreviewAny"])
    pos, neg = sd15_text(g, ckpt)
    lat = g.add("EmptyLatentImage", (420, 760), width=1024, height=1024, batch_size=1)
    ks = perflow_ksampler(g, (delta, 0), (pos, 0), (neg, 0), (lat, 0), steps=6, cfg=2.0, denoise=1.0)
    decode_save(g, ks, ckpt, "perflow/sdxl_extracted_delta_6step")
    return g


BUILDERS += [sd15_animatediff, sdxl_extracted_delta]


# ---------------------------------------------------------------- flow-matching models (issue 14): SD3.5, Flux

SD35_MEDIUM = Model(
    "checkpoints",
    "sd3.5_medium_incl_clips_t5xxlfp8scaled.safetensors",
    f"{HF}/Comfy-Org/stable-diffusion-3.5-fp8/resolve/main/sd3.5_medium_incl_clips_t5xxlfp8scaled.safetensors",
    "Stability AI Community License (free below USD 1M annual revenue; read it before commercial use)",
    "SD3.5 Medium with its CLIP-L, CLIP-G and T5-XXL (fp8) text encoders and VAE in one file",
)
FLUX_DEV = Model(
    "checkpoints",
    "flux1-dev-fp8.safetensors",
    f"{HF}/Comfy-Org/flux1-dev/resolve/main/flux1-dev-fp8.safetensors",
    "FLUX.1 [dev] Non-Commercial License",
    "Flux dev with its CLIP-L and T5-XXL (fp8) text encoders and VAE in one file",
)
SD35_LORA_NAME = "perflow-sd35-medium-lora.safetensors"
FLUX_LORA_NAME = "perflow-flux-dev-lora.safetensors"


def train_command(ckpt: Model, out: str, memory: str) -> str:
    """The exact command that trains the PeRFlow LoRA a flow workflow loads (README, Flow-matching models)."""
    return (
        f"python -m training.train --backend comfy --checkpoint ComfyUI/models/checkpoints/{ckpt.name} "
        f"--data my_images/ --resolution 1024 --lora-rank 32 --steps 4000 --lr 1e-4 --mixed-precision bf16 "
        f"{memory} --cache-latents cache/ --out runs/{out}\n"
        f"then copy runs/{out}/perflow_lora.safetensors to ComfyUI/models/perflow/"
    )


def flow_lora(g, model, name, pos):
    """PeRFlow Delta Loader reading a flow-model PeRFlow LoRA (windows, shift and velocity from its metadata)."""
    delta = g.add(
        "PeRFlowDeltaLoader", pos, "PeRFlow Delta Loader (your PeRFlow LoRA)", delta_name=name, strength=1.0,
        parameterization="auto", num_windows=0, model=model,
    )  # fmt: skip
    g.add("PreviewAny", (pos[0], pos[1] + 1), "PeRFlow summary", source=(delta, 1), **FRONTEND_WIDGETS["PreviewAny"])
    return delta


def sd35_medium_lora():
    g = Graph(
        "sd35_medium_perflow_lora_4step",
        "PeRFlow SD3.5 Medium (PeRFlow LoRA), 4 steps",
        "SD3.5 Medium + a PeRFlow LoRA, applied by PeRFlow Delta Loader: the model keeps its own flow model sampling "
        "(shift 3) and gains the LoRA's 4 windows. KSampler: sampler and scheduler 'perflow', 4 steps, cfg 4.5 "
        "(SD3's real CFG; a PeRFlow CFG Schedule may set it per window), 1024x1024.\n"
        "NO SUCH LORA IS PUBLISHED: train your own once on one GPU (README, Flow-matching models):\n"
        f"  {train_command(SD35_MEDIUM, 'sd35m', '--batch-size 4 --gradient-checkpointing')} as {SD35_LORA_NAME}",
    )
    ckpt = g.add("CheckpointLoaderSimple", (40, 200), "SD3.5 Medium", dl=SD35_MEDIUM, ckpt_name=SD35_MEDIUM.name)
    delta = flow_lora(g, (ckpt, 0), SD35_LORA_NAME, (420, 540))
    pos, neg = sd15_text(g, ckpt)
    lat = g.add("EmptySD3LatentImage", (420, 760), width=1024, height=1024, batch_size=1)
    ks = perflow_ksampler(g, (delta, 0), (pos, 0), (neg, 0), (lat, 0), steps=4, cfg=4.5, denoise=1.0)
    decode_save(g, ks, ckpt, "perflow/sd35_medium_4step")
    return g


def flux_dev_lora():
    g = Graph(
        "flux_dev_perflow_lora_4step",
        "PeRFlow Flux dev (PeRFlow LoRA), 4 steps",
        "Flux dev + a PeRFlow LoRA, applied by PeRFlow Delta Loader: the model keeps its own flow model sampling "
        "(mu 1.15, shift e^1.15: what ModelSamplingFlux gives at 1024x1024, and what the LoRA is trained at) and "
        "gains the LoRA's 4 windows. Flux dev's distilled guidance stays FluxGuidance 3.5 (as trained); KSampler "
        "cfg 1.0 runs one pass per step (the negative prompt is unused). Sampler and scheduler 'perflow', 4 steps, "
        "1024x1024.\n"
        "NO SUCH LORA IS PUBLISHED: train your own once on one large GPU (README, Flow-matching models):\n"
        f"  {train_command(FLUX_DEV, 'flux-dev', '--batch-size 1')} as {FLUX_LORA_NAME}",
    )
    ckpt = g.add("CheckpointLoaderSimple", (40, 200), "Flux dev", dl=FLUX_DEV, ckpt_name=FLUX_DEV.name)
    delta = flow_lora(g, (ckpt, 0), FLUX_LORA_NAME, (420, 540))
    pos = g.add("CLIPTextEncode", (420, 60), "Positive prompt", text=POSITIVE, clip=(ckpt, 1))
    guided = g.add("FluxGuidance", (420, 61), guidance=3.5, conditioning=(pos, 0))
    neg = g.add("CLIPTextEncode", (420, 290), "Negative prompt (unused at cfg 1)", text="", clip=(ckpt, 1))
    lat = g.add("EmptySD3LatentImage", (420, 760), width=1024, height=1024, batch_size=1)
    ks = perflow_ksampler(g, (delta, 0), (guided, 0), (neg, 0), (lat, 0), steps=4, cfg=1.0, denoise=1.0)
    decode_save(g, ks, ckpt, "perflow/flux_dev_4step")
    return g


BUILDERS += [sd35_medium_lora, flux_dev_lora]


if __name__ == "__main__":
    run(main)
