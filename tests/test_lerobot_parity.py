"""Weight and numerics parity with lerobot 0.6.1's π0 / π0.5 (``PI0Pytorch`` / ``PI05Pytorch``).

``scripts/lerobot_reference.py`` runs in its own venv (``scripts/setup_lerobot_env.sh`` builds
``.venv-lerobot``; override with ``LEROBOT_VENV``): it builds a tiny random lerobot policy, saves it with
lerobot's ``save_pretrained`` and records the inputs and outputs of ``sample_actions``. Here:

* ``test_plain_reference_matches_lerobot``: a plain-torch fp64 re-implementation of the math written
  down in docs/lerobot_pi0.md reproduces lerobot's prefix embeddings, first velocity and actions
  (checks the notes and the reference files; needs only the lerobot venv).
* ``test_flowrl_matches_lerobot``: ``flowrl.models`` loads lerobot's checkpoint and reproduces its
  actions within 1e-4 in fp32 (needs the lerobot venv and ``flowrl.models``' ``from_pretrained``).

Both skip with a reason when what they need is missing.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import lerobot_env, lerobot_python, lerobot_skip_reason

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "lerobot_reference.py"
VARIANTS = ("pi0", "pi05")
ATOL = 1e-4


LEROBOT_PY = lerobot_python()


@pytest.fixture(scope="module")
def lerobot_reference(tmp_path_factory):
    """``get(variant) -> Path``: a directory holding lerobot's tiny checkpoint and reference tensors,
    made once per module and variant by running scripts/lerobot_reference.py in the lerobot venv."""
    made: dict[str, Path] = {}

    def get(variant: str) -> Path:
        if variant in made:
            return made[variant]
        reason = lerobot_skip_reason("torch", "safetensors", "lerobot.policies.pi0.modeling_pi0")
        if reason:
            pytest.skip(reason)
        out = tmp_path_factory.mktemp(f"lerobot_{variant}")
        env = lerobot_env()
        proc = subprocess.run(
            [str(LEROBOT_PY), str(SCRIPT), "--variant", variant, "--out", str(out), "--seed", "0"],
            capture_output=True,
            text=True,
            env=env,
            cwd=str(out),
            timeout=600,
        )
        if proc.returncode != 0:
            pytest.fail(f"lerobot_reference.py --variant {variant} failed:\n{proc.stdout}\n{proc.stderr}")
        made[variant] = out
        return out

    return get


def _load(d: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    st = pytest.importorskip("safetensors.torch")
    weights = st.load_file(str(d / "model.safetensors"))
    ref = st.load_file(str(d / "reference.safetensors"))
    meta = json.loads((d / "meta.json").read_text())
    return weights, ref, meta


# ---------------------------------------------------------------------------------------------
# A plain-torch re-implementation of lerobot's sample_actions (fp64), as docs/lerobot_pi0.md writes it.
# ---------------------------------------------------------------------------------------------
_P = "paligemma_with_expert.paligemma.model."
_VIS = _P + "vision_tower.vision_model."
_LM = _P + "language_model."
_EXP = "paligemma_with_expert.gemma_expert.model."


def _plain_sample_actions(weights: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], meta: dict) -> dict:
    W = {k.removeprefix("model."): v.double() for k, v in weights.items()}
    tiny, pi05, K = meta["tiny"], meta["variant"] == "pi05", meta["K"]

    def lin(x, name, bias=True):
        return F.linear(x, W[name + ".weight"], W.get(name + ".bias") if bias else None)

    def siglip(img):
        vc = tiny["vision"]
        nh = vc["num_attention_heads"]
        x = F.conv2d(img, W[_VIS + "embeddings.patch_embedding.weight"], W[_VIS + "embeddings.patch_embedding.bias"],
                     stride=vc["patch_size"])
        x = x.flatten(2).transpose(1, 2) + W[_VIS + "embeddings.position_embedding.weight"]
        B, N, D = x.shape
        hd = D // nh
        for i in range(vc["num_hidden_layers"]):
            L = _VIS + f"encoder.layers.{i}."
            h = F.layer_norm(x, (D,), W[L + "layer_norm1.weight"], W[L + "layer_norm1.bias"], 1e-6)
            q, k, v = (lin(h, L + f"self_attn.{n}_proj").view(B, N, nh, hd).transpose(1, 2) for n in "qkv")
            a = torch.softmax(q @ k.transpose(-1, -2) * hd**-0.5, -1) @ v
            x = x + lin(a.transpose(1, 2).reshape(B, N, D), L + "self_attn.out_proj")
            h = F.layer_norm(x, (D,), W[L + "layer_norm2.weight"], W[L + "layer_norm2.bias"], 1e-6)
            x = x + lin(F.gelu(lin(h, L + "mlp.fc1"), approximate="tanh"), L + "mlp.fc2")
        x = F.layer_norm(x, (D,), W[_VIS + "post_layernorm.weight"], W[_VIS + "post_layernorm.bias"], 1e-6)
        return lin(x, _P + "multi_modal_projector.linear")  # no 1/sqrt(width) on the image tokens

    def rms(x, pre, cond=None):
        n = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        if cond is None:
            return n * (1 + W[pre + ".weight"]), None
        scale, shift, gate = lin(cond, pre + ".dense").unsqueeze(1).chunk(3, -1)
        return n * (1 + scale) + shift, gate

    def rope(x, pos):  # x (B, heads, S, hd); rotate-half, θ = 10⁴
        hd = x.shape[-1]
        inv = 1.0 / (10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
        f = pos[:, :, None].double() * inv
        emb = torch.cat([f, f], -1)[:, None]
        return x * emb.cos() + torch.cat([-x[..., hd // 2 :], x[..., : hd // 2]], -1) * emb.sin()

    def layer(x, pre, pos, allowed, hd, kv_prefix=None, cond=None):
        B, S, _ = x.shape
        h, gate1 = rms(x, pre + "input_layernorm", cond)
        q, k, v = (lin(h, pre + f"self_attn.{n}_proj", False).view(B, S, -1, hd).transpose(1, 2) for n in "qkv")
        q, k = rope(q, pos), rope(k, pos)
        kv = (k, v)
        if kv_prefix is not None:  # the expert's queries see the VLM's cached (post-RoPE) prefix K/V
            k, v = torch.cat([kv_prefix[0], k], 2), torch.cat([kv_prefix[1], v], 2)
        s = (q @ k.transpose(-1, -2) * hd**-0.5).masked_fill(~allowed[:, None], float("-inf"))
        a = torch.softmax(s, -1).nan_to_num(0.0) @ v  # 1 KV head broadcast over the 8 query heads
        o = lin(a.transpose(1, 2).reshape(B, S, -1), pre + "self_attn.o_proj", False)
        x = x + (o if gate1 is None else gate1 * o)
        h, gate2 = rms(x, pre + "post_attention_layernorm", cond)
        m = lin(F.gelu(lin(h, pre + "mlp.gate_proj", False), approximate="tanh") * lin(h, pre + "mlp.up_proj", False),
                pre + "mlp.down_proj", False)
        return x + (m if gate2 is None else gate2 * m), kv

    def sincos(t, dim):
        frac = torch.linspace(0.0, 1.0, dim // 2, dtype=torch.float64)
        period = 4e-3 * (4.0 / 4e-3) ** frac
        arg = (2 * math.pi / period)[None] * t[:, None].double()
        return torch.cat([arg.sin(), arg.cos()], 1)

    images, img_masks = ref["images"].double(), ref["img_masks"]
    tokens, lang_masks = ref["lang_tokens"], ref["lang_masks"]
    B, C = img_masks.shape
    embs = [siglip(images[:, c]) for c in range(C)]
    N = embs[0].shape[1]
    embs.append(W[_LM + "embed_tokens.weight"][tokens] * math.sqrt(tiny["vlm"]["width"]))
    x = torch.cat(embs, 1)
    prefix_embs = x
    pad = torch.cat([img_masks[:, c, None].expand(B, N) for c in range(C)] + [lang_masks], 1)
    pos = pad.long().cumsum(1) - 1
    allowed = pad[:, None, :] & pad[:, :, None]  # the prefix is bidirectional over its valid tokens
    cache = []
    for i in range(tiny["vlm"]["depth"]):
        x, kv = layer(x, _LM + f"layers.{i}.", pos, allowed, tiny["vlm"]["head_dim"])
        cache.append(kv)

    H, We = ref["noise"].shape[1], tiny["expert"]["width"]

    def velocity(xt, t):
        temb = sincos(torch.full((B,), t, dtype=torch.float32), We)  # t rounded to fp32, sin-cos in fp64
        a = lin(xt, "action_in_proj")
        cond = None
        if pi05:
            cond = F.silu(lin(F.silu(lin(temb, "time_mlp_in")), "time_mlp_out"))
            s, ar = a, [1] + [0] * (H - 1)
        else:
            at = lin(F.silu(lin(torch.cat([a, temb[:, None].expand_as(a)], -1), "action_time_mlp_in")),
                     "action_time_mlp_out")
            s, ar = torch.cat([lin(ref["state"].double(), "state_proj")[:, None], at], 1), [1, 1] + [0] * (H - 1)
        S = s.shape[1]
        cs = torch.tensor(ar).cumsum(0)
        suffix_allowed = (cs[None, :] <= cs[:, None])[None].expand(B, S, S)
        full = torch.cat([pad[:, None, :].expand(B, S, pad.shape[1]), suffix_allowed], 2)
        spos = pad.sum(1, keepdim=True) + torch.arange(S)[None]
        h = s
        for i in range(tiny["expert"]["depth"]):
            h, _ = layer(h, _EXP + f"layers.{i}.", spos, full, tiny["expert"]["head_dim"], cache[i], cond)
        h, _ = rms(h, _EXP + "norm", cond)
        return lin(h[:, -H:], "action_out_proj")

    xt, dt, v0 = ref["noise"].double(), -1.0 / K, None
    for k in range(K):
        v = velocity(xt, 1.0 + k * dt)
        v0 = v if v0 is None else v0
        xt = xt + dt * v
    return {"prefix_embs": prefix_embs, "v0": v0, "actions": xt}


@pytest.mark.parametrize("variant", VARIANTS)
def test_plain_reference_matches_lerobot(lerobot_reference, variant: str) -> None:
    weights, ref, meta = _load(lerobot_reference(variant))
    assert meta["versions"]["lerobot"] == "0.6.1"
    assert ref["img_masks"].logical_not().any(), "the reference must hold a masked camera"
    assert ref["lang_masks"].logical_not().any(), "the reference must hold padding tokens"
    ours = _plain_sample_actions(weights, ref, meta)
    for name, tol in (("prefix_embs", 1e-4), ("v0", 1e-4), ("actions", ATOL)):
        err = (ours[name] - ref[name].double()).abs().max().item()
        assert err <= tol, f"{meta['variant']} {name}: max |Δ| = {err:.3e} > {tol:g}"


# ---------------------------------------------------------------------------------------------
# flowrl's port
# ---------------------------------------------------------------------------------------------


def _flowrl_api():
    """``((from_pretrained, Observation, PolicyConfig | None), "")`` from flowrl.models, or ``(None, reason)``."""
    import importlib
    import importlib.util

    try:
        fm = importlib.import_module("flowrl.models")
    except Exception as e:  # flowrl is written concurrently: a failing import is a skip, not an error
        return None, f"flowrl.models does not import ({type(e).__name__}: {e})"

    def find(name: str, *modules: str):
        if getattr(fm, name, None) is not None:
            return getattr(fm, name)
        for m in modules:
            try:
                obj = getattr(importlib.import_module(f"flowrl.models.{m}"), name, None)
            except Exception:
                obj = None
            if obj is not None:
                return obj
        return None

    load = getattr(fm, "from_pretrained", None)
    if load is None:
        # Pi0Policy.from_pretrained delegates to flowrl.models.weights: usable once that exists
        cls = find("Pi0Policy", "policy")
        if cls is not None and importlib.util.find_spec("flowrl.models.weights") is not None:
            load = getattr(cls, "from_pretrained", None)
    obs_cls = find("Observation", "policy")
    if load is None or obs_cls is None:
        return None, "flowrl.models does not expose from_pretrained (and Observation) yet"
    return (load, obs_cls, find("PolicyConfig", "config")), ""


def _flowrl_config(cfg_cls, meta: dict):
    """The tiny sizes as a flowrl PolicyConfig (only its existing fields). lerobot's config.json names the
    full-size variants and SigLIP's head count cannot be read off the weights, so the test passes them."""
    t, inp = meta["tiny"], meta["inputs"]
    want = {
        "variant": meta["variant"],
        "action_dim": t["max_action_dim"],
        "action_horizon": meta["chunk_size"],
        "max_state_dim": t["max_state_dim"],
        "num_cameras": inp["num_cameras"],
        "image_size": t["vision"]["image_size"],
        "vocab_size": t["vocab_size"],
        "max_token_len": inp["lang_len"],
        "vision_width": t["vision"]["hidden_size"],
        "vision_depth": t["vision"]["num_hidden_layers"],
        "vision_mlp_dim": t["vision"]["intermediate_size"],
        "vision_heads": t["vision"]["num_attention_heads"],
        "patch_size": t["vision"]["patch_size"],
        "depth": t["vlm"]["depth"],
        "num_heads": t["vlm"]["num_heads"],
        "num_kv_heads": t["vlm"]["num_kv_heads"],
        "head_dim": t["vlm"]["head_dim"],
        "vlm_width": t["vlm"]["width"],
        "vlm_mlp_dim": t["vlm"]["mlp_dim"],
        "expert_width": t["expert"]["width"],
        "expert_mlp_dim": t["expert"]["mlp_dim"],
        "num_steps": meta["K"],
        "dtype": "float32",
    }
    if not dataclasses.is_dataclass(cfg_cls):
        return None
    names = {f.name for f in dataclasses.fields(cfg_cls)}
    return cfg_cls(**{k: v for k, v in want.items() if k in names})


@pytest.mark.parametrize("variant", VARIANTS)
def test_flowrl_matches_lerobot(lerobot_reference, variant: str) -> None:
    api, why = _flowrl_api()
    if api is None:
        pytest.skip(why)
    reference = lerobot_reference(variant)  # only now: a missing flowrl costs no lerobot run
    load, obs_cls, cfg_cls = api
    weights, ref, meta = _load(reference)
    del weights

    kwargs = {}
    params = inspect.signature(load).parameters
    if cfg_cls is not None and "config" in params:
        cfg = _flowrl_config(cfg_cls, meta)
        if cfg is not None:
            kwargs["config"] = cfg
    policy = load(str(reference), **kwargs)
    if hasattr(policy, "set_precision"):
        policy.set_precision(torch.float32)
    policy = policy.float().eval() if hasattr(policy, "float") else policy

    obs = obs_cls(
        images=ref["images"],
        image_masks=ref["img_masks"],
        tokens=ref["lang_tokens"],
        token_masks=ref["lang_masks"],
        state=ref["state"] if meta["variant"] == "pi0" else None,
    )
    with torch.no_grad():
        out = policy.sample_actions(obs, mode="ode", num_steps=meta["K"], noise=ref["noise"].clone())
    actions = getattr(out, "actions", out)
    assert actions.shape == ref["actions"].shape, f"actions {tuple(actions.shape)} != {tuple(ref['actions'].shape)}"
    err = (actions.double() - ref["actions"].double()).abs().max().item()
    assert err <= ATOL, f"{meta['variant']}: flowrl vs lerobot actions max |Δ| = {err:.3e} > {ATOL:g}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_flowrl_trained_weights_load_back_into_lerobot(lerobot_reference, variant: str, tmp_path) -> None:
    """``Pi0Policy.save_lerobot``: weights trained here (a perturbation of every tensor, standing in for RL) written
    in the layout of the lerobot checkpoint they came from load into lerobot's own ``PI0Policy`` /
    ``PI05Policy`` with every key (lerobot only warns about a key it cannot load) and give flowrl's actions for
    the same noise (≤ 1e-4 fp32), visibly different from the untrained checkpoint's."""
    from safetensors.torch import load_file

    from flowrl.models import Observation, Pi0Policy, PolicyConfig

    reference = lerobot_reference(variant)
    _, ref, meta = _load(reference)
    policy = Pi0Policy.from_pretrained(str(reference), config=_flowrl_config(PolicyConfig, meta)).float().eval()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for t in policy.parameters():
            t.add_(0.05 * t.abs().mean().clamp_min(1e-3) * torch.randn(t.shape, generator=g))
    obs = Observation(images=ref["images"], image_masks=ref["img_masks"], tokens=ref["lang_tokens"],
                      token_masks=ref["lang_masks"], state=ref["state"] if variant == "pi0" else None)
    with torch.no_grad():
        ours = policy.sample_actions(obs, mode="ode", num_steps=meta["K"], noise=ref["noise"].clone()).actions
    out = policy.save_lerobot(tmp_path / "export", like=reference)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "reference.safetensors").write_bytes((reference / "reference.safetensors").read_bytes())
    proc = subprocess.run([str(LEROBOT_PY), str(SCRIPT), "--variant", variant, "--out", str(run_dir), "--load",
                           str(out), "--num-steps", str(meta["K"])], capture_output=True, text=True,
                          env=lerobot_env(), cwd=str(tmp_path), timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    theirs = load_file(str(run_dir / "loaded.safetensors"))["actions"]
    err = (ours.double() - theirs.double()).abs().max().item()
    assert err <= ATOL, f"{variant}: lerobot on the exported weights vs flowrl: max |Δ| = {err:.3e}"
    moved = (theirs.double() - ref["actions"].double()).abs().max().item()
    assert moved > 100 * ATOL, f"{variant}: the exported weights give the untrained actions (Δ {moved:.2e})"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", "-ra"]))
