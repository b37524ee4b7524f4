"""Checkpoint loading: this project's format, lerobot PI0 / PI05, openpi's PyTorch conversion.

All three are local directories holding ``model.safetensors`` (and usually ``config.json``);
nothing is ever fetched from a hub.

The key map is a prefix table (:data:`KEY_MAP`): our module names mirror transformers' Gemma /
SigLIP names below the prefix, so a source key maps by replacing one prefix. Source keys are
first normalized by :data:`KEY_ALIASES` (the ``model.`` prefix of lerobot's policy wrapper,
older transformers layouts, openpi's π0 ``time_mlp_*`` naming). Keys that the policy does not use
(the LM heads) are dropped; a tied ``lm_head`` stands in for a missing ``embed_tokens``. Any other
unmatched source key, and any missing policy key outside the new heads (``noise_head``,
``value_vlm``, ``value_expert``, which lerobot checkpoints do not hold and keep their fresh
initialization), is listed in a :class:`CheckpointKeyError`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from flowrl.models.config import PolicyConfig

if TYPE_CHECKING:
    from flowrl.models.policy import Pi0Policy

__all__ = ["DIGEST_KEY", "KEY_ALIASES", "KEY_MAP", "CheckpointKeyError", "check_digest", "from_lerobot_state_dict",
           "load_policy", "read_safetensors", "save_lerobot", "save_safetensors", "tensor_digest",
           "to_lerobot_state_dict"]

#: safetensors metadata key of the SHA-256 digest that ``save_pretrained`` records (:func:`tensor_digest`).
DIGEST_KEY = "flowrl_sha256"


def tensor_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 (hex) over a state dict's names, dtypes, shapes and raw bytes, in sorted-name order.

    ``save_pretrained`` records it in the safetensors metadata and :func:`load_policy` recomputes it
    on the loaded tensors: bytes changed inside the file's tensor data (which the safetensors
    header checks cannot see) are an error instead of silently different weights. Costs one read of
    the weights, about 1 s per 2 GB on a CPU with SHA extensions.
    """
    import hashlib

    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach()
        h.update(f"{name}|{str(t.dtype).removeprefix('torch.')}|{tuple(t.shape)}\n".encode())
        if t.numel():
            h.update(t.reshape(-1).contiguous().cpu().view(torch.uint8).numpy().data)
    return h.hexdigest()


def save_safetensors(state: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """``safetensors.torch.save_file`` with the weights' :func:`tensor_digest` added to ``metadata``."""
    from safetensors.torch import save_file

    save_file(state, str(path), metadata={**metadata, DIGEST_KEY: tensor_digest(state)})


def check_digest(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str], hint: str = "") -> None:
    """A ValueError naming ``path`` when ``state`` (read from it) does not match the digest in its
    ``metadata``; files without one pass."""
    if DIGEST_KEY in metadata and tensor_digest(state) != metadata[DIGEST_KEY]:
        raise ValueError(f"{path}: the weights do not match the SHA-256 digest recorded when they were saved: the "
                         f"file's tensor data is corrupt (a disk or copy error); restore it from another copy{hint}")

_PG = "paligemma_with_expert.paligemma.model."
_EX = "paligemma_with_expert.gemma_expert.model."

#: (our prefix, lerobot prefix without lerobot's ``model.`` wrapper prefix; openpi's PyTorch keys
#: are these lerobot keys without ``model.``). Below the prefix the names are identical.
KEY_MAP: tuple[tuple[str, str], ...] = (
    ("vision_tower.vision_model.", _PG + "vision_tower.vision_model."),
    ("projector.", _PG + "multi_modal_projector.linear."),
    ("embed_tokens.", _PG + "language_model.embed_tokens."),
    ("vlm.", _PG + "language_model."),  # layers.{i}.{self_attn,mlp,input_layernorm,post_attention_layernorm}, norm
    ("expert.", _EX),  # same; adaRMS norms (π0.5) as ``…layernorm.dense.{weight,bias}``, ``norm.dense.*``
    ("action_in_proj.", "action_in_proj."),
    ("action_out_proj.", "action_out_proj."),
    ("state_proj.", "state_proj."),  # π0
    ("action_time_mlp_in.", "action_time_mlp_in."),  # π0
    ("action_time_mlp_out.", "action_time_mlp_out."),  # π0
    ("time_mlp_in.", "time_mlp_in."),  # π0.5
    ("time_mlp_out.", "time_mlp_out."),  # π0.5
)

#: Source-key rewrites applied (in order) before the map: (regex, replacement, variant or None).
KEY_ALIASES: tuple[tuple[str, str, str | None], ...] = (
    (r"^model\.", "", None),  # lerobot's PI0Policy/PI05Policy wrapper
    (r"^paligemma_with_expert\.paligemma\.language_model\.model\.", _PG + "language_model.", None),  # tf < 4.52
    (r"^paligemma_with_expert\.paligemma\.language_model\.", _PG + "language_model.", None),
    (r"^paligemma_with_expert\.paligemma\.vision_tower\.", _PG + "vision_tower.", None),
    (r"^paligemma_with_expert\.paligemma\.multi_modal_projector\.", _PG + "multi_modal_projector.", None),
    (r"vision_tower\.(?!vision_model\.)", "vision_tower.vision_model.", None),  # tf >= 5.x flattened SigLIP
    (r"^time_mlp_(in|out)\.", r"action_time_mlp_\1.", "pi0"),  # openpi π0 naming (lerobot's fix)
)

#: Source keys the policy does not use.
IGNORED_KEYS = (
    "paligemma_with_expert.paligemma.lm_head.weight",
    "paligemma_with_expert.gemma_expert.lm_head.weight",
    "paligemma_with_expert.gemma_expert.model.embed_tokens.weight",
)
#: Our parameters that foreign checkpoints do not hold (fresh initialization is kept).
NEW_PREFIXES = ("noise_head.", "value_vlm.", "value_expert.")


#: PolicyConfig fields added after the first flowrl checkpoints: a config.json without them takes
#: their defaults (any other absent field is an error, see from_pretrained)
LATER_CONFIG_FIELDS = ("activation_checkpointing",)


class CheckpointKeyError(KeyError):
    """Unmatched / missing checkpoint keys; ``unexpected`` and ``missing`` list them."""

    def __init__(self, path: str, unexpected: list[str], missing: list[str], shape_errors: list[str],
                 hint: str = ""):
        self.unexpected, self.missing, self.shape_errors = unexpected, missing, shape_errors
        lines = [f"checkpoint {path} does not match the policy:"]
        if hint:
            lines.append(f"  {hint}")
        for title, keys in (("unmatched checkpoint keys", unexpected), ("missing policy keys", missing),
                            ("shape mismatches", shape_errors)):
            if keys:
                shown = keys[:20] + ([f"... and {len(keys) - 20} more"] if len(keys) > 20 else [])
                lines.append(f"  {title} ({len(keys)}):\n    " + "\n    ".join(shown))
        self.message = "\n".join(lines)
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message


def _normalize(key: str, variant: str) -> str:
    for pat, rep, var in KEY_ALIASES:
        if var is None or var == variant:
            key = re.sub(pat, rep, key)
    return key


def _our_key(key: str, variant: str) -> str | None:
    """The policy key of a lerobot / openpi source key; ``""`` for a key the policy does not use
    (:data:`IGNORED_KEYS`), ``None`` for an unmatched one."""
    k = _normalize(key, variant)
    if k in IGNORED_KEYS:
        return ""
    for ours, theirs in sorted(KEY_MAP, key=lambda kv: -len(kv[1])):  # longest source prefix first
        if k.startswith(theirs):
            return ours + k[len(theirs):]
    return None


def from_lerobot_state_dict(sd: dict[str, torch.Tensor], variant: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """lerobot / openpi keys → our keys. Returns ``(mapped, unmatched source keys)``."""
    out: dict[str, torch.Tensor] = {}
    unmatched: list[str] = []
    lm_head = None
    for key, val in sd.items():
        ours = _our_key(key, variant)
        if ours == "":
            if _normalize(key, variant) == IGNORED_KEYS[0]:
                lm_head = val
        elif ours is None:
            unmatched.append(key)
        else:
            out[ours] = val
    if "embed_tokens.weight" not in out and lm_head is not None:  # tied embeddings saved once
        out["embed_tokens.weight"] = lm_head
    return out, unmatched


def to_lerobot_state_dict(sd: dict[str, torch.Tensor], prefix: str = "model.") -> dict[str, torch.Tensor]:
    """Our keys → lerobot keys (``prefix="model."``) or openpi PyTorch keys (``prefix=""``); the new heads
    are dropped."""
    table = sorted(KEY_MAP, key=lambda kv: -len(kv[0]))
    out = {}
    for key, val in sd.items():
        if key.startswith(NEW_PREFIXES):
            continue
        for ours, theirs in table:
            if key.startswith(ours):
                out[prefix + theirs + key[len(ours):]] = val
                break
        else:
            raise KeyError(f"to_lerobot_state_dict: no lerobot name for {key!r}")
    return out


def save_lerobot(policy: Pi0Policy, directory: str | os.PathLike, like: str | os.PathLike,
                 overwrite: bool = False) -> Path:
    """Write ``policy``'s weights as a lerobot PI0Policy / PI05Policy (or openpi PyTorch) checkpoint directory,
    in the layout of the checkpoint ``like`` it was loaded from, so that lerobot's ``from_pretrained`` loads the
    trained weights into the model it had (e.g. to deploy a policy fine-tuned here).

    ``directory`` receives a copy of every file of ``like`` (``config.json``, lerobot's processor files with the
    normalization statistics, ...) except ``model.safetensors``, which holds ``like``'s keys, shapes and dtypes with
    the policy's values (the unused LM heads: the tied token embedding for PaliGemma's, ``like``'s own tensor for
    the expert's). The new heads (value heads, Flow-Noise's noise head) have no place there and are left out;
    ``config.json`` is ``like``'s (e.g. its ``num_inference_steps``). The directory is built beside its
    destination and renamed into place.

    Raises:
        ValueError: ``like`` is not a lerobot / openpi checkpoint of this variant, or ``directory`` exists and is
            not empty (``overwrite=True`` replaces it).
        CheckpointKeyError: ``like``'s weights do not match the policy (keys it cannot map, sizes, or policy
            weights that ``like`` has no key for): lerobot would not load the result (its ``from_pretrained``
            only prints a warning and keeps a random model).
    """
    import shutil
    import tempfile

    src, dst = Path(like), Path(directory)
    layout, st_meta = _safetensors_layout(src / "model.safetensors")  # names, shapes, dtypes: no tensor read
    meta = _read_config_json(src / "config.json")
    if _is_flowrl_format(meta, st_meta):
        raise ValueError(f"save_lerobot: like={src} is a flowrl checkpoint; give the lerobot / openpi checkpoint "
                         "the policy was loaded from (its file layout and config are copied)")
    variant = policy.config.variant
    if meta.get("type") not in (None, variant):
        raise ValueError(f"save_lerobot: like={src} is a lerobot {meta.get('type')!r} checkpoint, the policy is "
                         f"{variant!r}")
    if dst.is_symlink():  # the checks below would see its target, the staging and the swap act on the link's place
        raise ValueError(f"save_lerobot: {dst} is a symbolic link: give the directory's real path")
    rs, rd = src.resolve(), dst.parent.resolve() / dst.name
    if rs.is_relative_to(rd) or rd.is_relative_to(rs):  # replacing dst would delete like; staging would copy itself
        raise ValueError(f"save_lerobot: directory {dst} is, holds or lies inside like={src}: write to a directory "
                         "of its own")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not overwrite:
        raise ValueError(f"save_lerobot: {dst} exists and is not empty (overwrite=True, or the export CLI's "
                         "--overwrite, replaces it)")
    own = {k: v.detach() for k, v in policy.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    unmatched, shape_errors, used = [], [], set()
    kept: list[str] = []  # like's tensors the policy has no use for (the expert's LM head and embedding)
    for key, (shape, dtype) in layout.items():
        ours = _our_key(key, variant)
        if ours == "":  # unused by π0: PaliGemma's LM head is tied to the embedding; the expert's are kept
            if _normalize(key, variant) != IGNORED_KEYS[0]:
                kept.append(key)
                continue
            val = own["embed_tokens.weight"]
            used.add("embed_tokens.weight")  # a checkpoint that holds the tied pair once holds it there
        elif ours is None or ours not in own:
            unmatched.append(key)
            continue
        else:
            val = own[ours]
            used.add(ours)
        if tuple(val.shape) != shape:
            shape_errors.append(f"{key}: like {shape} vs policy {tuple(val.shape)}")
            continue
        out[key] = val.to("cpu", dtype).contiguous().clone()  # clone: a tied pair must not share storage
    missing = [k for k in own if k not in used and not k.startswith(NEW_PREFIXES)]
    if unmatched or shape_errors or missing:
        raise CheckpointKeyError(str(src), unmatched, missing, shape_errors,
                                 "save_lerobot: like must be the checkpoint the policy was loaded from (or one of "
                                 "its sizes)")
    from safetensors import safe_open
    from safetensors.torch import save_file

    if kept:
        with safe_open(str(src / "model.safetensors"), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in kept})
    dst.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        for f in src.iterdir():
            if f.name == "model.safetensors":
                continue
            if f.is_dir():
                shutil.copytree(f, stage / f.name)
            else:
                shutil.copy2(f, stage / f.name)
        save_file(out, str(stage / "model.safetensors"), metadata={k: v for k, v in st_meta.items()
                                                                   if k != DIGEST_KEY} or {"format": "pt"})
        stage.chmod(0o777 & ~_umask())
        old = dst.with_name(f".{dst.name}.replaced.{os.getpid()}")
        if dst.exists() or dst.is_symlink():
            os.replace(dst, old)
        try:
            os.replace(stage, dst)
        except BaseException:
            if (old.exists() or old.is_symlink()) and not dst.exists():
                os.replace(old, dst)  # the previous export (or file) back in its place
            raise
    except BaseException:
        _remove_tree(stage)
        raise
    if old.is_dir() and not old.is_symlink():
        _remove_tree(old)
    elif old.exists() or old.is_symlink():
        old.unlink()
    return dst


def _remove_tree(path: Path) -> None:
    """``shutil.rmtree`` that also removes read-only directories (``like``'s modes are copied along: a read-only
    folder in it made the replaced export undeletable); what it cannot remove is a warning naming it, not a
    silently kept copy."""
    import shutil
    import stat
    import warnings

    def retry(func: Any, p: str, _exc: Any) -> None:
        parent = os.path.dirname(p)
        for d in (parent, p):
            try:
                os.chmod(d, os.stat(d).st_mode | stat.S_IWUSR | stat.S_IXUSR | stat.S_IRUSR)
            except OSError:
                pass
        func(p)

    import sys

    try:
        shutil.rmtree(path, **({"onexc": retry} if sys.version_info >= (3, 12) else {"onerror": retry}))
    except OSError as e:
        warnings.warn(f"save_lerobot: could not remove {path} ({e}): delete it by hand", stacklevel=3)


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def _safetensors_layout(path: Path) -> tuple[dict[str, tuple[tuple[int, ...], torch.dtype]], dict[str, str]]:
    """``{name: (shape, dtype)}`` and the metadata of a safetensors file, from its header alone."""
    from safetensors import safe_open

    if not path.is_file():
        raise FileNotFoundError(f"no {path.name} in {path.parent} (a local checkpoint directory is required)")
    try:
        with safe_open(str(path), framework="pt") as f:
            layout = {}
            for k in f.keys():
                sl = f.get_slice(k)
                dt = _ST_DTYPES.get(sl.get_dtype())
                layout[k] = (tuple(sl.get_shape()), dt if dt is not None else f.get_tensor(k).dtype)
            return layout, f.metadata() or {}
    except Exception as e:  # safetensors' own SafetensorError for a damaged header
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from e


def _is_flowrl_format(meta: dict[str, Any], st_meta: dict[str, str]) -> bool:
    """Whether a checkpoint is this project's, from its ``config.json`` (``meta``) or its safetensors metadata (a
    config.json written by hand from ``config.to_dict()`` lacks the ``flowrl_policy`` marker)."""
    return bool(meta.get("flowrl_policy")) or st_meta.get("flowrl") == "pi0policy"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _infer_config(sd: dict[str, torch.Tensor], meta: dict[str, Any], variant: str, overrides: dict[str, Any]
                  ) -> PolicyConfig:
    """Sizes from the mapped tensors' shapes, the rest from lerobot's config.json (``meta``)."""
    base = PolicyConfig(variant=variant)

    def shape(k):
        if k not in sd:
            raise CheckpointKeyError("(config inference)", [], [k], [])
        return tuple(sd[k].shape)

    kv_dim = shape("vlm.layers.0.self_attn.k_proj.weight")[0]
    q_dim = shape("vlm.layers.0.self_attn.q_proj.weight")[0]
    num_kv = overrides.get("num_kv_heads", 1)
    head_dim = kv_dim // num_kv
    vw, _, ps, _ = shape("vision_tower.vision_model.embeddings.patch_embedding.weight")
    if vw != 1152 and "vision_heads" not in overrides:
        # the head count of a SigLIP tower cannot be read off its weights; So400m (1152) has 16
        raise ValueError(f"from_pretrained: this checkpoint's SigLIP tower has width {vw} (not So400m's 1152), and "
                         "its number of attention heads cannot be read from the weights: pass vision_heads=... "
                         "(or a full config=PolicyConfig(...))")
    npos = shape("vision_tower.vision_model.embeddings.position_embedding.weight")[0]
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"vlm\.layers\.(\d+)\.", k)))
    vdepth = 1 + max(int(m.group(1)) for k in sd
                     if (m := re.match(r"vision_tower\.vision_model\.encoder\.layers\.(\d+)\.", k)))
    res = meta.get("image_resolution") or [round(npos ** 0.5) * ps] * 2
    feats = meta.get("input_features") or {}
    cams = [k for k, v in feats.items() if isinstance(v, dict) and v.get("type") == "VISUAL"]
    fields: dict[str, Any] = dict(
        variant=variant,
        action_dim=shape("action_in_proj.weight")[1],
        action_horizon=meta.get("chunk_size", base.action_horizon),
        max_state_dim=shape("state_proj.weight")[1] if variant == "pi0" else meta.get("max_state_dim", 32),
        num_cameras=len(cams) or base.num_cameras,
        image_size=int(res[0]),
        vocab_size=shape("embed_tokens.weight")[0],
        max_token_len=meta.get("tokenizer_max_length", base.max_token_len if variant == "pi0" else 200),
        vision_width=vw, vision_depth=vdepth,
        vision_mlp_dim=shape("vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight")[0],
        vision_heads=16, patch_size=ps,
        depth=depth, num_heads=q_dim // head_dim, num_kv_heads=num_kv, head_dim=head_dim,
        vlm_width=shape("vlm.layers.0.self_attn.q_proj.weight")[1],
        vlm_mlp_dim=shape("vlm.layers.0.mlp.gate_proj.weight")[0],
        expert_width=shape("expert.layers.0.self_attn.q_proj.weight")[1],
        expert_mlp_dim=shape("expert.layers.0.mlp.gate_proj.weight")[0],
        min_period=meta.get("min_period", base.min_period), max_period=meta.get("max_period", base.max_period),
        num_steps=meta.get("num_inference_steps", base.num_steps),
        dtype=meta.get("dtype", "float32") if meta.get("dtype") in ("float32", "bfloat16") else "float32",
    )
    fields.update(overrides)
    return PolicyConfig(**fields)


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of ``path`` (on the CPU) and its metadata; a missing, truncated or corrupt file is an
    error naming it."""
    from safetensors import safe_open

    if not path.is_file():
        raise FileNotFoundError(f"no {path.name} in {path.parent} (a local checkpoint directory is required; "
                                "nothing is downloaded)")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except Exception as e:  # safetensors raises its own SafetensorError (header) or OSError/RuntimeError (data)
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from e


def _read_config_json(path: Path) -> dict[str, Any]:
    """``config.json`` as a dict (``{}`` when absent); invalid JSON or a non-object is an error naming the file."""
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"from_pretrained: {path} is not valid JSON: {e}") from e
    if not isinstance(meta, dict):
        raise ValueError(f"from_pretrained: {path} must hold a JSON object, got {type(meta).__name__}")
    return meta


def load_policy(cls: type[Pi0Policy], directory: str | os.PathLike, config: PolicyConfig | None = None,
                strict: bool = True, verify: bool = True, **overrides: Any) -> Pi0Policy:
    """Load ``directory`` (our format, lerobot PI0/PI05, or openpi PyTorch) into a new policy.

    ``config``: use these sizes instead of reading / inferring them. ``overrides``: config fields
    replaced on top of the read / inferred / given config (e.g. ``vision_heads`` of a non-So400m tower,
    ``num_steps`` or ``activation_checkpointing``; a size that does not match the weights is a
    :class:`CheckpointKeyError`).
    ``strict``: raise :class:`CheckpointKeyError` on unmatched or missing keys.
    ``verify``: check the weights against the SHA-256 digest that ``save_pretrained`` recorded in the
    file (:func:`tensor_digest`; a mismatch is a ValueError naming the file). Files without one
    (lerobot, openpi, flowrl files written before the digest) load unchecked.
    """
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"from_pretrained: {d} is not a local directory (no hub access)")
    meta = _read_config_json(d / "config.json")
    raw, st_meta = read_safetensors(d / "model.safetensors")
    if verify:
        check_digest(d / "model.safetensors", raw, st_meta, " (verify=False loads it anyway)")
    hint = ""
    # the safetensors metadata says whose file it is: a config.json without the flowrl_policy marker (written by
    # hand from config.to_dict()) is still this project's, not a lerobot one to convert
    if _is_flowrl_format(meta, st_meta):
        if config is None and not meta:
            raise FileNotFoundError(f"from_pretrained: {d} holds a flowrl model.safetensors but no config.json, or "
                                    "an empty one (its sizes): restore config.json or pass config=PolicyConfig(...)")
        if config is None:
            try:
                config = PolicyConfig.from_dict({k: v for k, v in meta.items() if k != "flowrl_policy"})
            except (TypeError, ValueError) as e:
                raise ValueError(f"from_pretrained: {d / 'config.json'}: {e}") from e
            absent = [f.name for f in dataclasses.fields(PolicyConfig)
                      if f.name not in meta and f.name not in overrides]
            if [f for f in absent if f not in LATER_CONFIG_FIELDS]:
                # π0's full-size default for a field the weights' shapes do not pin (action_horizon,
                # num_cameras, max_token_len, ...) would load a different policy without a word
                raise CheckpointKeyError(str(d), [], [], [], (
                    f"{d / 'config.json'} lacks {', '.join(absent)}: PolicyConfig's defaults are π0's full size, "
                    "not this checkpoint's; restore the field(s) or pass them as overrides "
                    "(from_pretrained(dir, field=value))"))
            if absent:  # fields added to the format later: their defaults are what older files meant
                hint = (f"{d / 'config.json'} lacks {', '.join(absent)}: PolicyConfig's defaults were used")
        cfg = config.replace(**overrides) if overrides else config
        sd, unmatched, fmt = raw, [], "flowrl"
    else:
        typ = meta.get("type")
        if typ in ("pi0", "pi05"):
            variant = typ
        elif config is not None:
            variant = config.variant
        else:
            variant = "pi05" if any(".dense." in k or k.startswith(("time_mlp", "model.time_mlp")) for k in raw) and \
                not any("state_proj" in k for k in raw) else "pi0"
        sd, unmatched = from_lerobot_state_dict(raw, variant)
        if config is not None:
            cfg = config.replace(**overrides) if overrides else config
        else:
            cfg = _infer_config(sd, meta, variant, overrides)
        fmt = "lerobot" if any(k.startswith("model.") for k in raw) else "openpi"
    policy = cls(cfg)
    q = sd.get("vlm.layers.0.self_attn.q_proj.weight")
    if q is not None and q.dtype != policy.compute_dtype:
        policy.set_precision(q.dtype)  # keep the checkpoint's Gemma dtype (bit-exact round trips)
    own = policy.state_dict()
    missing = [k for k in own if k not in sd and not (fmt != "flowrl" and k.startswith(NEW_PREFIXES))]
    unexpected = unmatched + [k for k in sd if k not in own]
    shape_errors = [f"{k}: checkpoint {tuple(v.shape)} vs policy {tuple(own[k].shape)}"
                    for k, v in sd.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if shape_errors or (strict and (missing or unexpected)):
        raise CheckpointKeyError(str(d), unexpected, missing, shape_errors, hint)
    # a flowrl file keeps every tensor's saved dtype (a model cast with .to(bfloat16) round-trips
    # exactly, not only set_precision's); converted lerobot/openpi weights take the policy's dtypes
    by_name = {**dict(policy.named_parameters()), **dict(policy.named_buffers())} if fmt == "flowrl" else {}
    with torch.no_grad():
        for k, v in sd.items():
            if k not in own:
                continue
            t = by_name.get(k)
            if t is not None and v.dtype != t.dtype and v.is_floating_point() and t.is_floating_point():
                t.data = v.to(t.device)  # v is the file's own tensor: no copy needed
            else:
                own[k].copy_(v.to(own[k].dtype))
    policy.load_format = fmt  # type: ignore[attr-defined]
    return policy
