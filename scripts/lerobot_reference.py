#!/usr/bin/env python
"""Tiny random lerobot π0 / π0.5 checkpoints and reference outputs, for weight/numerics parity.

Runs INSIDE the lerobot venv (``scripts/setup_lerobot_env.sh`` builds ``.venv-lerobot``); it imports
neither flowrl nor flowkernels, and downloads nothing (no tokenizer, no hub weights)::

    .venv-lerobot/bin/python scripts/lerobot_reference.py --variant pi0 --out /tmp/pi0_tiny [--seed 0]
    .venv-lerobot/bin/python scripts/lerobot_reference.py --variant pi05 --dump-keys      # key table (markdown)
    .venv-lerobot/bin/python scripts/lerobot_reference.py --variant pi0 --out /tmp/pi0_tiny --load /tmp/exported

What ``--out DIR`` receives:

- ``config.json``, ``model.safetensors``: the policy saved by lerobot's own ``save_pretrained``,
  byte-for-byte what lerobot writes. NOTE: lerobot's config.json names the *real* variants
  (``gemma_2b`` / ``gemma_300m``) and does not hold the tiny sizes: read them from the tensor shapes,
  or from ``meta.json["tiny"]`` (the SigLIP head count cannot be read off the shapes).
- ``reference.safetensors``: the exact tensors given to and returned by the low-level model call
  ``PI0Pytorch.sample_actions(images, img_masks, lang_tokens, lang_masks, state, noise=noise, num_steps=K)``
  (``PI05Pytorch.sample_actions(images, img_masks, lang_tokens, lang_masks, noise=noise, num_steps=K)``):

  ========== ======================= ============================================================
  images     (B, C, 3, H, W) fp32    in [-1, 1], after lerobot's image preprocessing (x*2-1)
  img_masks  (B, C) bool             one camera of one row is False (masked)
  lang_tokens (B, L) int64           right-padded with token 0
  lang_masks (B, L) bool             row 1 has padding
  state      (B, 32) fp32            π0 only (π0.5 tokenizes state into the prompt)
  noise      (B, chunk, 32) fp32     x at t = 1
  actions    (B, chunk, 32) fp32     output of sample_actions (K Euler steps)
  v0         (B, chunk, 32) fp32     velocity of the first denoise step (t = 1, x_t = noise)
  v_all      (K, B, chunk, 32) fp32  velocity of every step (step k at t = 1 - k/K)
  prefix_embs (B, P, W) fp32         embed_prefix output: C·(H/p)² image tokens then L language tokens
  ========== ======================= ============================================================

- ``meta.json``: K, the tiny sizes, shapes, seeds and the lerobot / transformers / torch versions.

Everything is float32 (lerobot's ``dtype="float32"``; the bf16 path is not used).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from importlib.metadata import version
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from safetensors.torch import save_file

# ---------------------------------------------------------------------------------------------
# The tiny configuration. lerobot hard-codes 8 query heads (``att_output.reshape(B, -1, 1 * 8 *
# head_dim)`` in compute_layer_complete), and the joint attention needs both experts to share depth,
# head_dim and the number of KV heads.
# ---------------------------------------------------------------------------------------------
TINY = {
    "vlm": {"width": 64, "depth": 2, "mlp_dim": 128, "num_heads": 8, "num_kv_heads": 1, "head_dim": 16},
    "expert": {"width": 32, "depth": 2, "mlp_dim": 96, "num_heads": 8, "num_kv_heads": 1, "head_dim": 16},
    # SigLIP: 32x32 images, patch 8 -> 16 tokens per camera; 4 heads of 8 (not inferable from shapes)
    "vision": {
        "image_size": 32,
        "patch_size": 8,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
    },
    "vocab_size": 257,
    "max_state_dim": 32,
    "max_action_dim": 32,
    "num_inference_steps": 10,
}
# the inputs
BATCH, NUM_CAMERAS, LANG_LEN, RAW_STATE_DIM, RAW_ACTION_DIM = 2, 2, 12, 8, 7
CAMERAS = ("observation.images.base_0_rgb", "observation.images.left_wrist_0_rgb")


def _patch_lerobot_builders() -> None:
    """Make lerobot build tiny random models: its configs only accept gemma_300m / gemma_2b."""
    import lerobot.policies.pi0.modeling_pi0 as m0
    import lerobot.policies.pi05.modeling_pi05 as m05
    from lerobot.policies.pi_gemma import PaliGemmaForConditionalGenerationWithPiGemma, PiGemmaForCausalLM

    def get_gemma_config(variant: str):
        key = {"gemma_2b": "vlm", "gemma_300m": "expert"}[variant]
        return m0.GemmaConfig(**TINY[key])

    def build_paligemma(config):
        v = TINY["vision"]
        for name, value in v.items():
            setattr(config.vision_config, name, value)
        width = config.text_config.hidden_size
        config.vision_config.projection_dim = width  # the projector maps SigLIP width -> VLM width
        config.projection_dim = width
        config.text_config.num_image_tokens = (v["image_size"] // v["patch_size"]) ** 2
        config.text_config.vocab_size = TINY["vocab_size"]
        config._vocab_size = TINY["vocab_size"]
        config.image_token_index = TINY["vocab_size"] - 1
        return PaliGemmaForConditionalGenerationWithPiGemma(config=config)

    def build_expert(config):
        config.vocab_size = TINY["vocab_size"]
        return PiGemmaForCausalLM(config=config)

    for mod in (m0, m05):
        mod.get_gemma_config = get_gemma_config
        mod.PaliGemmaForConditionalGenerationWithPiGemma = build_paligemma
        mod.PiGemmaForCausalLM = build_expert


def _make_config(variant: str, chunk: int):
    from lerobot.configs import FeatureType, PolicyFeature

    res = TINY["vision"]["image_size"]
    input_features = {cam: PolicyFeature(type=FeatureType.VISUAL, shape=(3, res, res)) for cam in CAMERAS}
    input_features["observation.state"] = PolicyFeature(type=FeatureType.STATE, shape=(RAW_STATE_DIM,))
    output_features = {"action": PolicyFeature(type=FeatureType.ACTION, shape=(RAW_ACTION_DIM,))}
    kwargs = dict(
        paligemma_variant="gemma_2b",
        action_expert_variant="gemma_300m",
        dtype="float32",
        chunk_size=chunk,
        n_action_steps=chunk,
        max_state_dim=TINY["max_state_dim"],
        max_action_dim=TINY["max_action_dim"],
        num_inference_steps=TINY["num_inference_steps"],
        image_resolution=(res, res),
        device="cpu",
        input_features=input_features,
        output_features=output_features,
    )
    if variant == "pi0":
        from lerobot.policies.pi0.configuration_pi0 import PI0Config

        return PI0Config(**kwargs)
    from lerobot.policies.pi05.configuration_pi05 import PI05Config

    return PI05Config(**kwargs)


def _policy_class(variant: str):
    if variant == "pi0":
        from lerobot.policies.pi0.modeling_pi0 import PI0Policy

        return PI0Policy
    from lerobot.policies.pi05.modeling_pi05 import PI05Policy

    return PI05Policy


@torch.no_grad()
def _randomize(policy: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter with seeded random values.

    transformers/lerobot initialise many tensors to zero (biases, RMSNorm weights, and the adaRMS
    ``dense`` layers, whose zero gate would switch every expert block off): a parity test on such a
    model would miss bugs. Matrices get N(0, 1/fan_in); LayerNorm weights 1 + N(0, 0.1²); every other
    vector (biases, Gemma RMSNorm ``w`` in x·(1 + w)) N(0, 0.1²).
    """
    g = torch.Generator().manual_seed(seed)
    for name, p in policy.named_parameters():
        if p.ndim >= 2:
            fan_in = p[0].numel()
            p.copy_(torch.randn(p.shape, generator=g) * fan_in**-0.5)
        elif (
            "layer_norm" in name or "post_layernorm" in name
        ) and name.endswith(".weight"):  # SigLIP nn.LayerNorm: y = (x - mean)/std * w + b
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    # PaliGemma ties lm_head to the token embedding, but lerobot's module tree holds two tensors, and
    # its from_pretrained copies lm_head into embed_tokens when loading: keep them equal so the load
    # order cannot matter (lm_head itself is unused by π0).
    paligemma = policy.model.paligemma_with_expert.paligemma
    paligemma.lm_head.weight.copy_(paligemma.model.language_model.embed_tokens.weight)


def build_policy(variant: str, chunk: int, seed: int):
    _patch_lerobot_builders()
    policy = _policy_class(variant)(_make_config(variant, chunk))
    policy.to(torch.float32)
    _randomize(policy, seed)
    policy.eval()
    return policy


def _module_of(key: str) -> str:
    k = key.removeprefix("model.")
    if ".vision_tower." in k:
        return "SigLIP vision tower"
    if ".multi_modal_projector." in k:
        return "multi_modal_projector (SigLIP width -> VLM width)"
    if "paligemma.lm_head" in k:
        return "PaliGemma lm_head (unused by π0)"
    if "gemma_expert.lm_head" in k:
        return "expert lm_head (unused)"
    if "language_model.embed_tokens" in k:
        return "Gemma token embedding (× sqrt(width) at lookup)"
    for who, tag in (("language_model", "Gemma VLM"), ("gemma_expert", "action expert")):
        if who in k:
            if ".dense." in k:
                return f"{tag} adaRMS dense (cond -> scale, shift, gate)"
            if "layernorm" in k or k.endswith("model.norm.weight") or ".norm." in k:
                return f"{tag} RMSNorm"
            if ".self_attn." in k:
                return f"{tag} attention"
            if ".mlp." in k:
                return f"{tag} GeGLU MLP"
            return tag
    return k.split(".")[0] if k.split(".")[0] != "paligemma_with_expert" else "?"


def dump_keys(policy, variant: str) -> str:
    sd = policy.state_dict()
    lines = [
        f"#### {variant}: {len(sd)} tensors, {sum(t.numel() for t in sd.values())} parameters",
        "",
        "| key | shape | module |",
        "|---|---|---|",
    ]
    for k, t in sd.items():
        lines.append(f"| `{k}` | {tuple(t.shape)} | {_module_of(k)} |")
    return "\n".join(lines)


def make_inputs(policy, variant: str, chunk: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 1)
    res = TINY["vision"]["image_size"]
    # raw images in [0, 1] (lerobot's dataset convention) go through the policy's own preprocessing
    batch = {cam: torch.rand(BATCH, 3, res, res, generator=g) for cam in CAMERAS}
    images, img_masks = policy._preprocess_images(batch)
    images = torch.stack(images, dim=1).contiguous()  # (B, C, 3, H, W) in [-1, 1]
    img_masks = torch.stack(img_masks, dim=1).clone()  # (B, C) bool
    img_masks[1, 1] = False  # camera 1 of row 1 is missing
    tokens = torch.randint(1, TINY["vocab_size"], (BATCH, LANG_LEN), generator=g, dtype=torch.int64)
    lang_masks = torch.ones(BATCH, LANG_LEN, dtype=torch.bool)
    lang_masks[1, 8:] = False  # row 1: 8 real tokens, 4 right-padding tokens (id 0, as the tokenizer pads)
    tokens[~lang_masks] = 0
    out = {
        "images": images,
        "img_masks": img_masks,
        "lang_tokens": tokens,
        "lang_masks": lang_masks,
        "noise": torch.randn(BATCH, chunk, TINY["max_action_dim"], generator=g),
    }
    if variant == "pi0":
        # every one of the 32 state dims is random (lerobot would zero-pad the robot's 8): all of
        # state_proj is exercised
        out["state"] = torch.randn(BATCH, TINY["max_state_dim"], generator=g)
    return out


@torch.no_grad()
def run_reference(policy, variant: str, inputs: dict[str, torch.Tensor], num_steps: int) -> dict[str, torch.Tensor]:
    model = policy.model
    images = list(inputs["images"].unbind(1))
    img_masks = list(inputs["img_masks"].unbind(1))
    args = [images, img_masks, inputs["lang_tokens"], inputs["lang_masks"]]
    if variant == "pi0":
        args.append(inputs["state"])

    prefix_embs, _, _ = model.embed_prefix(*args[:4])

    velocities = []
    orig = model.denoise_step

    def spy(*a, **k):
        v = orig(*a, **k)
        velocities.append(v.clone())
        return v

    model.denoise_step = spy  # instance attribute: sample_actions' lambda looks it up on self
    try:
        actions = model.sample_actions(*args, noise=inputs["noise"].clone(), num_steps=num_steps)
    finally:
        del model.denoise_step
    assert len(velocities) == num_steps
    return {
        "actions": actions.contiguous(),
        "v0": velocities[0].contiguous(),
        "v_all": torch.stack(velocities).contiguous(),
        "prefix_embs": prefix_embs.contiguous(),
    }


def _check_reload(variant: str, out: Path, inputs, ref, num_steps: int) -> float:
    """The checkpoint as written must load back through lerobot and reproduce the actions."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        policy = _policy_class(variant).from_pretrained(str(out), local_files_only=True)
    policy.to(torch.float32).eval()
    again = run_reference(policy, variant, inputs, num_steps)
    return (again["actions"] - ref["actions"]).abs().max().item()


def run_loaded(variant: str, ckpt: Path, ref_dir: Path, num_steps: int) -> int:
    """``--load``: lerobot's ``from_pretrained`` on ``ckpt`` (e.g. written by flowrl's ``save_lerobot``) must load
    every key (lerobot only prints a warning otherwise, and keeps its random weights); its ``sample_actions`` on
    the inputs of ``ref_dir/reference.safetensors`` go to ``ref_dir/loaded.safetensors``."""
    import contextlib
    import io

    from safetensors.torch import load_file

    _patch_lerobot_builders()
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        policy = _policy_class(variant).from_pretrained(str(ckpt), local_files_only=True)
    if "All keys loaded successfully!" not in log.getvalue():
        print(f"error: lerobot did not load every key of {ckpt}:\n{log.getvalue()}", file=sys.stderr)
        return 1
    policy.to(torch.float32).eval()
    inputs = {k: v for k, v in load_file(str(ref_dir / "reference.safetensors")).items()
              if k in ("images", "img_masks", "lang_tokens", "lang_masks", "state", "noise")}
    out = run_reference(policy, variant, inputs, num_steps)
    save_file({"actions": out["actions"]}, str(ref_dir / "loaded.safetensors"))
    print(f"{variant}: loaded {ckpt} with every key; actions written to {ref_dir / 'loaded.safetensors'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variant", choices=("pi0", "pi05"), required=True)
    ap.add_argument("--out", type=Path, help="directory to write the checkpoint and reference tensors into")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chunk", type=int, default=50, help="action horizon (chunk_size)")
    ap.add_argument("--num-steps", type=int, default=TINY["num_inference_steps"], help="Euler steps K")
    ap.add_argument("--dump-keys", action="store_true", help="print the state-dict keys as a markdown table")
    ap.add_argument("--no-reload-check", action="store_true", help="skip reloading the saved checkpoint")
    ap.add_argument("--load", type=Path, default=None,
                    help="instead: load this checkpoint with lerobot (every key must load) and run sample_actions on "
                         "the inputs of --out/reference.safetensors, into --out/loaded.safetensors")
    args = ap.parse_args(argv)
    if args.load is not None:
        if args.out is None:
            ap.error("--load needs --out (the directory of an earlier run's reference.safetensors)")
        return run_loaded(args.variant, args.load, args.out, args.num_steps)
    if args.out is None and not args.dump_keys:
        ap.error("--out is required unless --dump-keys")

    torch.manual_seed(args.seed)
    policy = build_policy(args.variant, args.chunk, args.seed)
    if args.dump_keys:
        print(dump_keys(policy, args.variant))
    if args.out is None:
        return 0

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    policy.save_pretrained(out)
    inputs = make_inputs(policy, args.variant, args.chunk, args.seed)
    ref = run_reference(policy, args.variant, inputs, args.num_steps)
    save_file({**inputs, **ref}, str(out / "reference.safetensors"))

    reload_err = None if args.no_reload_check else _check_reload(args.variant, out, inputs, ref, args.num_steps)
    if reload_err is not None and reload_err != 0.0:
        print(f"error: reloaded checkpoint differs by {reload_err:.3e}", file=sys.stderr)
        return 1

    num_tokens_per_image = (TINY["vision"]["image_size"] // TINY["vision"]["patch_size"]) ** 2
    meta = {
        "variant": args.variant,
        "policy_class": type(policy).__name__,
        "num_steps": args.num_steps,
        "K": args.num_steps,
        "seed": args.seed,
        "chunk_size": args.chunk,
        "tiny": TINY,
        "inputs": {
            "batch": BATCH,
            "num_cameras": NUM_CAMERAS,
            "cameras": list(CAMERAS),
            "lang_len": LANG_LEN,
            "raw_state_dim": RAW_STATE_DIM,
            "raw_action_dim": RAW_ACTION_DIM,
            "tokens_per_image": num_tokens_per_image,
            "prefix_len": NUM_CAMERAS * num_tokens_per_image + LANG_LEN,
        },
        "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in {**inputs, **ref}.items()},
        "call": (
            "PI0Pytorch.sample_actions(images.unbind(1), img_masks.unbind(1), lang_tokens, lang_masks, state, "
            "noise=noise, num_steps=K)"
            if args.variant == "pi0"
            else "PI05Pytorch.sample_actions(images.unbind(1), img_masks.unbind(1), lang_tokens, lang_masks, "
            "noise=noise, num_steps=K)"
        ),
        "reload_max_abs_diff": reload_err,
        "num_params": sum(p.numel() for p in policy.parameters()),
        "versions": {
            "lerobot": version("lerobot"),
            "transformers": version("transformers"),
            "torch": torch.__version__,
            "python": sys.version.split()[0],
        },
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(
        f"{args.variant}: wrote {out} (K={args.num_steps}, chunk={args.chunk}, |actions|max="
        f"{ref['actions'].abs().max().item():.3f}, reload diff={reload_err})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
