"""Edge cases and bad input of flowrl's user-facing API (tiny config, CPU, seconds).

Each test is the regression test of one audit finding: a crash deep inside torch, an error that
did not name the argument, or a value silently ignored / replaced.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from flowrl.config import ConfigError, load_config
from flowrl.models import CheckpointKeyError, Observation, Pi0Policy, from_pretrained, get_config

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def policy() -> Pi0Policy:
    torch.manual_seed(0)
    return Pi0Policy(get_config("tiny")).eval()


def _obs(p: Pi0Policy, B: int = 3, L: int = 6, seed: int = 0) -> Observation:
    c = p.config
    g = torch.Generator().manual_seed(seed)
    return Observation(images=torch.rand(B, c.num_cameras, 3, c.image_size, c.image_size, generator=g) * 2 - 1,
                       image_masks=torch.ones(B, c.num_cameras, dtype=torch.bool),
                       tokens=torch.randint(0, c.vocab_size, (B, L), generator=g),
                       token_masks=torch.ones(B, L, dtype=torch.bool),
                       state=torch.randn(B, 8, generator=g) if c.variant == "pi0" else None)


# ------------------------------------------------------------------------------------------------ policy inputs


def test_t_grid_is_a_copy_and_inference_mode_rollouts_train_later():
    """SampleResult.t_grid was the policy's own cached grid (writing to it changed every later call), and a
    rollout under torch.inference_mode() cached an inference-tensor grid that a later chain_logprob with the
    same K could not save for backward."""
    torch.manual_seed(0)
    p = Pi0Policy(get_config("tiny")).eval()
    obs = _obs(p, B=2)
    with torch.inference_mode():
        r = p.sample_actions(obs, "sde", num_steps=4, generator=torch.Generator().manual_seed(0))
    chain = r.chain.clone()  # a normal tensor
    p.chain_logprob(obs, chain, "sde").sum().backward()
    r = p.sample_actions(obs, "ode", num_steps=4, noise=chain[:, 0])
    r.t_grid.mul_(0.5)
    assert p.sample_actions(obs, "ode", num_steps=4, noise=chain[:, 0]).t_grid.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]


def test_batch_without_any_camera_runs_and_matches_a_mixed_batch(policy):
    """Every camera masked in the whole batch (language-only) crashed inside SigLIP on 0 images."""
    p = policy
    obs = _obs(p, B=2)
    no_cam = replace(obs, image_masks=torch.zeros(2, 2, dtype=torch.bool))
    noise = torch.randn(2, 50, 32, generator=torch.Generator().manual_seed(1))
    res = p.sample_actions(no_cam, num_steps=2, noise=noise)
    assert torch.isfinite(res.actions).all()
    mixed = replace(obs, image_masks=torch.tensor([[False, False], [True, True]]))
    ref = p.sample_actions(mixed, num_steps=2, noise=noise)
    assert torch.allclose(res.actions[0], ref.actions[0], atol=1e-5)  # row 0 has no camera in both batches
    with pytest.raises(ValueError, match="no valid prefix token"):
        p.encode_prefix(replace(no_cam, token_masks=torch.zeros(2, 6, dtype=torch.bool)))


def test_padding_token_ids_may_be_out_of_vocab(policy):
    """Tokenizers pad with -1 / -100 / pad ids past the vocab: masked-out slots were refused
    (or, unchecked, would index the embedding out of range). Only unmasked ids are checked."""
    p, V = policy, policy.config.vocab_size
    obs = _obs(p, B=2)
    mask = torch.tensor([[True] * 4 + [False] * 2, [True] * 3 + [False] * 3])
    noise = torch.randn(2, 50, 32, generator=torch.Generator().manual_seed(2))
    ref = p.sample_actions(replace(obs, tokens=obs.tokens.masked_fill(~mask, 0), token_masks=mask),
                           num_steps=2, noise=noise)
    for pad in (-100, -1, V, V + 7):
        out = p.sample_actions(replace(obs, tokens=obs.tokens.masked_fill(~mask, pad), token_masks=mask),
                               num_steps=2, noise=noise)
        assert torch.equal(out.actions, ref.actions)
    bad = obs.tokens.clone()
    bad[1, 0] = V
    with pytest.raises(ValueError, match=r"ids where token_masks is True must lie in \[0, vocab_size"):
        p.encode_prefix(replace(obs, tokens=bad, token_masks=mask))


def test_empty_batch_is_a_clear_error(policy):
    with pytest.raises(ValueError, match="batch size 0"):
        policy.sample_actions(_obs(policy, B=0), num_steps=2)


@pytest.mark.parametrize("kw, name", [({"num_steps": True}, "num_steps"), ({"group_size": True}, "group_size"),
                                      ({"group_size": 2.0}, "group_size")])
def test_sample_actions_counts_reject_bools_and_floats(policy, kw, name):
    """num_steps=True ran 1 step silently; group_size=True crashed in repeat_interleave."""
    with pytest.raises(ValueError, match=f"{name} must be an int >= 1"):
        policy.sample_actions(_obs(policy), **{"num_steps": 2, **kw})


def test_sample_actions_accepts_numpy_ints(policy):
    import numpy as np

    r = policy.sample_actions(_obs(policy), num_steps=np.int64(2), group_size=np.int64(2))
    assert r.chain.shape == (6, 3, 50, 32)


def test_sample_actions_ode_refuses_step_noise(policy):
    """ode adds no transition noise; a given step_noise used to be ignored without a word."""
    c = policy.config
    step_noise = torch.randn(3, 2, c.action_horizon, c.action_dim)
    with pytest.raises(ValueError, match="step_noise is only used by modes 'sde' and 'noise'"):
        policy.sample_actions(_obs(policy), mode="ode", num_steps=2, step_noise=step_noise)
    r = policy.sample_actions(_obs(policy), mode="sde", num_steps=2, step_noise=step_noise)
    assert torch.isfinite(r.actions).all()


@pytest.mark.parametrize("group_size", [0, -2, True, 2.0])
def test_chain_logprob_group_size_is_checked(policy, group_size):
    obs = _obs(policy)
    r = policy.sample_actions(obs, mode="noise", num_steps=2, group_size=2)
    with pytest.raises(ValueError, match="group_size must be an int >= 1"):
        policy.chain_logprob(obs, r.chain, "noise", group_size=group_size)


def test_chain_logprob_empty_chain_and_bad_steps(policy):
    """A chain of one state divided by zero; steps == K raised an IndexError; float steps were a kernel error."""
    cache = policy.encode_prefix(_obs(policy))
    r = policy.sample_actions(cache, mode="sde", num_steps=3)
    with pytest.raises(ValueError, match="chain must hold K\\+1 >= 2 states"):
        policy.chain_logprob(cache, r.chain[:, :1].contiguous(), "noise")
    with pytest.raises(ValueError, match=r"steps must lie in \[0, K=3\)"):
        policy.chain_logprob(cache, r.chain, "sde", steps=torch.full((3,), 3))
    with pytest.raises(TypeError, match="steps must be int64"):
        policy.chain_logprob(cache, r.chain, "sde", steps=torch.full((3,), 1.0))
    assert policy.chain_logprob(cache, r.chain, "sde", steps=torch.full((3,), 2)).shape == (3,)


def test_cfm_losses_without_pairs(policy):
    cache = policy.encode_prefix(_obs(policy))
    with pytest.raises(ValueError, match="noise must hold N >= 1"):
        policy.cfm_losses(cache, torch.zeros(3, 50, 32), torch.zeros(3, 0, 50, 32), torch.zeros(3, 0))


def test_from_cameras_checks_each_camera(policy):
    obs = _obs(policy)
    a = torch.rand(3, 3, 32, 32)
    with pytest.raises(ValueError, match=r"images\['b'\] is \(2, 3, 32, 32\)"):
        Observation.from_cameras({"a": a, "b": a[:2]}, ["a", "b"], obs.tokens, obs.token_masks, obs.state)
    with pytest.raises(ValueError, match=r"images\['b'\] is \(3, 3, 16, 16\)"):
        Observation.from_cameras({"a": a, "b": torch.rand(3, 3, 16, 16)}, ["a", "b"], obs.tokens, obs.token_masks)
    with pytest.raises(TypeError, match=r"images\['a'\] must be float"):  # was "cannot be converted to uint8_t"
        Observation.from_cameras({"a": (a * 255).byte()}, ["a", "b"], obs.tokens, obs.token_masks,
                                 allow_missing=True)
    with pytest.raises(ValueError, match="duplicates"):
        Observation.from_cameras({"a": a}, ["a", "a"], obs.tokens, obs.token_masks)
    with pytest.raises(TypeError, match="camera_names must be a list"):
        Observation.from_cameras({"a": a}, "ab", obs.tokens, obs.token_masks, allow_missing=True)


def test_set_precision_checks_the_dtype():
    p = Pi0Policy(get_config("tiny"))
    with pytest.raises(ValueError, match="set_precision: dtype must be a torch dtype or one of"):
        p.set_precision("fp16")
    with pytest.raises(ValueError, match="floating-point"):
        p.set_precision(torch.int8)
    assert p.set_precision("bfloat16").compute_dtype == torch.bfloat16


def test_policy_config_checks_float_fields():
    """noise_level='abc' (e.g. model.overrides.noise_level=abc) was accepted and failed mid-rollout."""
    with pytest.raises(ValueError, match="noise_level must be a finite number"):
        get_config("tiny", noise_level="abc")
    with pytest.raises(ValueError, match="image_size must be a positive int"):  # was a TypeError from `%`
        get_config("tiny", image_size="32")
    with pytest.raises(ValueError, match="patch_size must be a positive int"):  # was a ZeroDivisionError
        get_config("tiny", patch_size=0)
    with pytest.raises(ValueError, match="noise_level"):
        get_config("tiny", noise_level=-1.0)


# ------------------------------------------------------------------------------------------------ checkpoints


def test_from_pretrained_applies_overrides(policy, tmp_path):
    """Overrides were silently ignored for this project's format (and with config=)."""
    policy.save_pretrained(tmp_path / "ck")
    q = from_pretrained(str(tmp_path / "ck"), num_steps=3, activation_checkpointing="vlm")
    assert q.config.num_steps == 3 and q.config.activation_checkpointing == "vlm"
    q = from_pretrained(str(tmp_path / "ck"), config=policy.config, num_steps=4)
    assert q.config.num_steps == 4
    for k, v in policy.state_dict().items():
        assert torch.equal(v, q.state_dict()[k]), k


def test_from_pretrained_damaged_directories(policy, tmp_path):
    d = tmp_path / "ck"
    policy.save_pretrained(d)
    cfg_text = (d / "config.json").read_text()
    # config.json lost: named, and config= still loads it (was a CheckpointKeyError from the openpi path)
    (d / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        from_pretrained(str(d))
    assert from_pretrained(str(d), config=policy.config).load_format == "flowrl"
    for text, msg in (("{not json", "is not valid JSON"), ("[1, 2]", "must hold a JSON object"),
                      (json.dumps({**json.loads(cfg_text), "depth": "2"}), "config.json: PolicyConfig: depth")):
        (d / "config.json").write_text(text)
        with pytest.raises(ValueError, match=msg):
            from_pretrained(str(d))
    # a field lost from config.json: π0's full-size default would load another policy; the error names
    # the field, whether the weights pin it (vlm_width) or not (action_horizon, num_cameras, max_token_len)
    for lost in ("vlm_width", "action_horizon", "num_cameras", "max_token_len"):
        (d / "config.json").write_text(json.dumps({k: v for k, v in json.loads(cfg_text).items() if k != lost}))
        with pytest.raises(CheckpointKeyError, match=rf"config\.json lacks {lost}: PolicyConfig's defaults are"):
            from_pretrained(str(d))
        assert from_pretrained(str(d), **{lost: getattr(policy.config, lost)}).config == policy.config
    # a field added to the format later takes its default
    (d / "config.json").write_text(json.dumps({k: v for k, v in json.loads(cfg_text).items()
                                               if k != "activation_checkpointing"}))
    assert from_pretrained(str(d)).config == policy.config
    (d / "config.json").write_text(cfg_text)
    good = (d / "model.safetensors").read_bytes()
    for data in (b"", good[:5000], b"x" * 100):
        (d / "model.safetensors").write_bytes(data)
        with pytest.raises(ValueError, match=r"model\.safetensors is not a readable safetensors file"):
            from_pretrained(str(d))


def test_from_pretrained_detects_changed_tensor_bytes(policy, tmp_path):
    """Bytes changed inside the tensor data (a disk or copy error) passed the safetensors header checks and
    loaded as other weights, silently; save_pretrained records a SHA-256 digest that loading checks."""
    import struct

    from safetensors import safe_open

    from flowrl.models.weights import DIGEST_KEY, tensor_digest

    d = tmp_path / "ck"
    policy.save_pretrained(d)
    with safe_open(str(d / "model.safetensors"), framework="pt") as f:
        assert f.metadata()[DIGEST_KEY] == tensor_digest(policy.state_dict())
    data = bytearray((d / "model.safetensors").read_bytes())
    header = 8 + struct.unpack("<Q", data[:8])[0]
    data[header + (len(data) - header) // 2] ^= 0x10  # one bit in the middle of the tensor data
    (d / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model\.safetensors: the weights do not match the SHA-256 digest"):
        from_pretrained(str(d))
    q = from_pretrained(str(d), verify=False)  # the escape hatch loads it as it is
    assert sum(not torch.equal(v, q.state_dict()[k]) for k, v in policy.state_dict().items()) == 1
    # the digest covers names, dtypes and shapes too, and bf16 weights
    sd = {k: v.clone() for k, v in policy.state_dict().items()}
    assert tensor_digest(sd) == tensor_digest({k: sd[k] for k in reversed(list(sd))})
    k0 = next(k for k, v in sd.items() if v.is_floating_point())
    assert tensor_digest({**sd, k0: sd[k0].to(torch.bfloat16)}) != tensor_digest(sd)
    assert tensor_digest({**sd, k0: sd[k0].reshape(1, -1)}) != tensor_digest(sd)


# ------------------------------------------------------------------------------------------------ training config


@pytest.mark.parametrize("over", ["wandb=off", "wandb=no", "wandb=false"])
def test_wandb_off_spelled_as_a_yaml_bool(over):
    """YAML reads `off` as False: `wandb=off` (the default's own spelling) was rejected."""
    assert load_config(None, [over]).wandb == "off"


def test_wandb_off_in_a_yaml_file(tmp_path):
    (tmp_path / "c.yaml").write_text("wandb: off\ntensorboard: false\n")
    assert load_config(tmp_path / "c.yaml").wandb == "off"


@pytest.mark.parametrize("over, msg", [
    ("algo.lr=true", "algo.lr: expected a number, got True"),  # was silently 1.0
    ("algo.lr=.nan", "algo.lr: expected a finite number"),
    ("algo.lr=inf", "algo.lr: expected a finite number"),
    ("algo.lr=-1e-4", "algo.lr must be >= 0"),
    ("algo.gamma=2", "algo.gamma must be in [0, 1]"),
    ("algo.clip=0", "algo.clip must be > 0"),
    ("algo.sft_batch=0", "algo.sft_batch must be >= 1"),
    ("algo.sft_steps=-1", "algo.sft_steps must be >= 1"),  # was silently clamped to 1
    ("algo.num_demos=0", "algo.num_demos must be >= 1"),
    ("algo.vla_ensemble=0", "algo.vla_ensemble must be >= 1"),  # was silently clamped to 1
    ("algo.vla_latent_steps=0", "algo.vla_latent_steps must be >= 1"),
    ("algo.logprob_reduce=none", "algo.logprob_reduce must be sum or mean"),
    ("algo.noise_min=0.5", "algo.noise_min < algo.noise_max"),
    ("model.num_value_heads=0", "model.num_value_heads must be >= 1"),
    ("model.variant=pi1", "model.variant must be pi0 or pi05"),
    ("env.image_size=0", "env.image_size must be >= 1"),
    ("env.image_size=4", "env.image_size must be >= 8 for reach"),
    ("env.chunk_steps=0", "env.chunk_steps must be >= 1"),
    ("env.max_episode_steps=3", "env.max_episode_steps=3 must be >= env.chunk_steps=5"),
    ("env.num_targets=0", "env.num_targets must be in [1, 4]"),
    ("env.expert_quality=2", "env.expert_quality must be in [0, 1]"),
    ("env.flip=x", "env.flip must be vertical or rotate180"),
    # model.overrides names were checked only when the policy was built (after the envs had started)
    ("model.overrides.action_horizn=10", "model.overrides.action_horizn: not a PolicyConfig field"),
    # fields the trainer sets from its own keys: the override silently disagreed with them
    ("model.overrides.num_steps=8", "model.overrides.num_steps: set by algo.num_steps"),
    ("model.overrides.value_heads=3", "model.overrides.value_heads: set by model.num_value_heads"),
    # found by a fuzzing pass: GRPO groups of one learn nothing (every advantage 0); a value clip of 0 stalls
    # the critic (max of the clipped and unclipped losses stops its gradient after one step)
    ("algo.name=grpo algo.group_size=1", "algo.group_size must be >= 2 for grpo"),
    ("algo.value_clip=0", "algo.value_clip must be > 0, or null for no clipping"),
    # its target-network update read ZeRO-3's empty partitions after the first rollout
    ("algo.name=vla_fpo zero_stage=3", "zero_stage=3 does not combine with vla_fpo"),
    # the SPO penalty was silently dropped with the clip
    ("algo.name=vla_fpo algo.vla_spo=true algo.vla_clip=false", "pick one"),
])
def test_config_values_are_checked_before_work(over, msg):
    """These passed load_config and then failed inside the env or the first update (a traceback, not
    a ConfigError naming the key), or were silently replaced."""
    with pytest.raises(ConfigError) as ei:
        load_config(None, over.split())
    assert msg in str(ei.value)


def test_run_dir_that_is_a_file_and_vla_fpo_without_init_from(tmp_path, monkeypatch):
    """A run_dir naming a file failed with a FileExistsError traceback; VLA-FPO without model.init_from trained a
    latent actor over a random, frozen π0 without a word."""
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(ConfigError, match="exists and is not a directory"):
        load_config(None, [f"run_dir={f}"])
    with pytest.warns(UserWarning, match="vla_fpo without model.init_from: π0 is randomly initialized"):
        load_config(None, ["algo.name=vla_fpo"])
    with pytest.warns(UserWarning, match="model.freeze=none is ignored by vla_fpo"):
        load_config(None, ["algo.name=vla_fpo", "model.freeze=none"])
    # once per process (load_config and the trainer both validate), and on rank 0 only
    import warnings

    from flowrl.config import _WARNED

    _WARNED.clear()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(3):
            load_config(None, ["algo.name=vla_fpo"])
    assert len([w for w in seen if "without model.init_from" in str(w.message)]) == 1
    _WARNED.clear()
    monkeypatch.setenv("RANK", "1")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        load_config(None, ["algo.name=vla_fpo"])
    assert not [w for w in seen if "without model.init_from" in str(w.message)]


def test_shipped_configs_still_validate(tmp_path):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "flowrl" / "configs"
    for path in sorted(root.glob("*.yaml")):
        load_config(path)
    (tmp_path / "model.safetensors").touch()  # validate() checks that a policy file is there, not its contents
    for path in sorted((root / "libero").glob("*.yaml")):
        load_config(path, [f"model.init_from={tmp_path}"])


# ------------------------------------------------------------------------------------------------ eval CLI


@pytest.mark.parametrize("argv, msg", [
    (["--num-steps", "0"], "--num-steps must be >= 1, got 0"),  # 0 fell back to the run's K
    (["--num-envs", "0"], "--num-envs must be >= 1, got 0"),  # 0 fell back to 32 envs
    (["--episodes", "0"], "--episodes must be >= 1, got 0"),
    (["--max-episode-steps", "0"], "--max-episode-steps must be >= 1"),
    (["--device", "tpu"], "--device: 'tpu' is not a torch device"),
    (["--videos", "2", "--video-dir", "v"], "--videos, --video-dir: LIBERO-only"),  # silently ignored on reach
    (["--task-ids", "0"], "--task-ids: LIBERO-only"),
    (["--videos", "2"], "--videos 2 needs --video-dir"),
    # found by a fuzzing pass: both failed only after the whole evaluation (or at the first CUDA call)
    (["--json", "."], "--json . is a directory"),
    pytest.param(["--device", "cuda"], "this torch has no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")),
])
def test_eval_cli_bad_arguments(tmp_path, monkeypatch, argv, msg):
    from flowrl import models
    from flowrl.eval import main

    Pi0Policy(get_config("tiny", num_cameras=1, action_horizon=10)).save_pretrained(tmp_path / "pol")

    def no_load(*a, **k):
        raise AssertionError("the policy was loaded before the arguments were checked")

    monkeypatch.setattr(models, "from_pretrained", no_load)
    with pytest.raises(ValueError) as ei:
        main(["--checkpoint", str(tmp_path / "pol"), *argv])
    assert msg in str(ei.value)


def test_eval_and_export_cli_on_a_directory_without_a_checkpoint(tmp_path):
    """An empty directory got a raw FileNotFoundError traceback (eval), or "its run did not start from a lerobot
    checkpoint" (export): both now say it holds no checkpoint, under their own program name."""
    from flowrl import export_lerobot
    from flowrl.eval import main

    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match=r"flowrl\.eval: --checkpoint .*empty holds no checkpoint"):
        main(["--checkpoint", str(tmp_path / "empty")])
    with pytest.raises(SystemExit, match=r"flowrl\.export_lerobot: --checkpoint .*empty holds no checkpoint"):
        export_lerobot.main(["--checkpoint", str(tmp_path / "empty"), "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match=r"flowrl\.export_lerobot: .*does not exist"):
        export_lerobot.main(["--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "out")])


def test_config_values_are_read_as_written(tmp_path):
    """Found by fuzzing: string keys went through YAML (run_dir=010 became "8", 12:30 became "750"),
    duplicate YAML keys dropped a whole section silently, YAML syntax errors escaped as raw PyYAML
    exceptions, and algo.dual_clip could not be disabled."""
    cfg = load_config(None, ["run_dir=010", "wandb_project=12:30", "algo.dual_clip=null", "wandb=false"])
    assert (cfg.run_dir, cfg.wandb_project, cfg.algo.dual_clip, cfg.wandb) == ("010", "12:30", None, "off")
    with pytest.raises(ConfigError, match=r"env.task_ids: cannot read the value '\[1, 2'"):
        load_config(None, ["env.task_ids=[1, 2"])
    p = tmp_path / "c.yaml"
    p.write_text("algo:\n  lr: 0.1\nalgo:\n  epochs: 7\n")
    with pytest.raises(ConfigError, match=r"key 'algo' appears twice .*line 3"):
        load_config(p)
    p.write_text("run_dir: 0755\n")
    with pytest.raises(ConfigError, match=r"run_dir: expected a string, got the number 493 .*quote the value"):
        load_config(p)
    p.write_text("run_dir: '0755'\nalgo: {lr: 1e-3, dual_clip: null}\n")
    cfg = load_config(p)
    assert (cfg.run_dir, cfg.algo.lr, cfg.algo.dual_clip) == ("0755", 1e-3, None)
    p.write_text("algo: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)


def test_policy_inputs_second_fuzzing_pass(policy, tmp_path):
    """Found by a fuzzing pass over flowrl.models: each was a silent wrong answer or an unrelated error."""
    import dataclasses

    p = policy
    obs = _obs(p, B=2)
    noise = torch.zeros(2, p.config.action_horizon, p.config.action_dim)
    # pixels in [0, 255] (or NaN) on a valid camera changed the actions silently; a masked camera may hold anything
    for bad in (obs.images.add(1).mul(127.5), obs.images.clone().fill_(float("nan"))):
        with pytest.raises(ValueError, match=r"obs.images must lie in \[-1, 1\]"):
            p.sample_actions(replace(obs, images=bad), num_steps=1, noise=noise)
    masked = obs.images.clone()
    masked[1, 0] = float("nan")
    mask = obs.image_masks.clone()
    mask[1, 0] = False
    p.sample_actions(replace(obs, images=masked, image_masks=mask), num_steps=1, noise=noise)
    with pytest.raises(ValueError, match=r"obs\.state holds NaN"):
        p.sample_actions(replace(obs, state=torch.full_like(obs.state, float("nan"))), num_steps=1, noise=noise)
    # a cache of another policy's structure or variant: silently used (depth 1 < 2) or a raw IndexError
    cache = p.encode_prefix(obs)
    other = Pi0Policy(get_config("tiny", depth=1)).eval()
    with pytest.raises(ValueError, match=r"keys/values .* do not fit this policy: expected \(depth=1"):
        other.sample_actions(cache, num_steps=1, noise=noise)
    pi05 = Pi0Policy(get_config("tiny", variant="pi05")).eval()
    with pytest.raises(ValueError, match="encoded by a pi0 policy, this one is pi05"):
        pi05.sample_actions(cache, num_steps=1, noise=noise)
    with pytest.raises(ValueError, match=r"the PrefixCache is torch\.bfloat16"):
        p.sample_actions(replace(cache, keys=cache.keys.bfloat16(), values=cache.values.bfloat16()), num_steps=1,
                         noise=noise)
    # arguments of the wrong type were taken by float() / truthiness
    with pytest.raises(TypeError, match="noise_level must be a real number, got str"):
        p.sample_actions(cache, mode="sde", num_steps=2, noise=noise, noise_level="0.5")
    chain = p.sample_actions(cache, mode="sde", num_steps=2, noise=noise).chain
    with pytest.raises(TypeError, match="include_initial must be a bool or None, got str"):
        p.chain_logprob(obs, chain, "sde", include_initial="no")
    with pytest.raises(ValueError, match=r"sde_steps must be an int64/int32 tensor .* got torch.float32 \(2,\)"):
        p.sample_actions(cache, mode="sde", num_steps=2, noise=noise, sde_steps=torch.zeros(2))
    with pytest.raises(TypeError, match=r"config must be a PolicyConfig .*PolicyConfig\.from_dict"):
        Pi0Policy(dataclasses.asdict(p.config))
    with pytest.raises(ValueError, match="min_period < max_period"):
        get_config("tiny", min_period=5.0, max_period=4.0)
    with pytest.raises(ValueError, match="vision_heads 3 must divide vision_width"):
        get_config("tiny", vision_heads=3)
    # a flowrl checkpoint whose config.json lacks the flowrl_policy marker was converted as a lerobot one
    p.save_pretrained(tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    (tmp_path / "ck" / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "flowrl_policy"}))
    assert from_pretrained(str(tmp_path / "ck")).load_format == "flowrl"
    (tmp_path / "ck" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"no config\.json, or an empty one"):
        from_pretrained(str(tmp_path / "ck"))


def test_policy_inputs_third_fuzzing_pass(policy, tmp_path):
    """Found by a third fuzzing pass: a cache whose fields disagree with its batch was used (a (1,) suffix_offset
    broadcast to every row: wrong RoPE positions, other actions), a state_dict of the wrong shapes replaced a good
    checkpoint by one that cannot be loaded, and a generator of the wrong type reached torch.randn."""
    p = policy
    obs = _obs(p, B=2)
    noise = torch.zeros(2, p.config.action_horizon, p.config.action_dim)
    cache = p.encode_prefix(obs)
    for field in ("suffix_offset", "prefix_lens", "pooled", "prefix_mask"):
        bad = replace(cache, **{field: getattr(cache, field)[:1]})
        with pytest.raises(ValueError, match=rf"PrefixCache's {field} must be a \(2,"):
            p.sample_actions(bad, num_steps=1, noise=noise)
    with pytest.raises(ValueError, match=r"PrefixCache's pooled must be"):
        p.value(replace(cache, pooled=cache.pooled[:1]))
    with pytest.raises(ValueError, match=r"PrefixCache's suffix_offset must be .* int64/int32"):
        p.cfm_losses(replace(cache, suffix_offset=cache.suffix_offset.float()), noise, noise[:, None], torch.rand(2, 1))
    empty = replace(cache, keys=cache.keys[:, :0], values=cache.values[:, :0], prefix_mask=cache.prefix_mask[:0],
                    prefix_lens=cache.prefix_lens[:0], suffix_offset=cache.suffix_offset[:0], pooled=cache.pooled[:0])
    with pytest.raises(ValueError, match=r"holds no observation \(batch 0\)"):
        p.sample_actions(empty, num_steps=1)
    with pytest.raises(TypeError, match=r"generator must be a torch\.Generator or None, got str"):
        p.sample_actions(cache, num_steps=1, generator="x")
    # save_pretrained(state_dict=...) with the policy's keys but other shapes: refused, the old checkpoint kept
    p.save_pretrained(tmp_path / "ck")
    before = (tmp_path / "ck" / "model.safetensors").read_bytes()
    halved = {k: v[:1] if v.dim() else v for k, v in p.state_dict().items()}
    with pytest.raises(ValueError, match=r"state_dict entries do not have the policy's shape \(nothing written\)"):
        p.save_pretrained(tmp_path / "ck", state_dict=halved)
    with pytest.raises(ValueError, match="expected"):
        p.save_pretrained(tmp_path / "new", state_dict={k: v.tolist() for k, v in p.state_dict().items()})
    assert (tmp_path / "ck" / "model.safetensors").read_bytes() == before and not (tmp_path / "new").exists()
    p.save_pretrained(tmp_path / "ck", state_dict={k: v.clone() for k, v in p.state_dict().items()})
    back = Pi0Policy.from_pretrained(tmp_path / "ck").state_dict()
    assert all(torch.equal(v, back[k]) for k, v in p.state_dict().items())


def test_get_config_unknown_field_lists_the_fields():
    """A misspelt field got dataclasses' bare "unexpected keyword argument"."""
    with pytest.raises(TypeError, match=r"unknown field\(s\) \['action_horizn'\]; fields: .*'action_horizon'"):
        get_config("tiny", action_horizn=10)


def test_package_data_holds_every_shipped_config():
    """pyproject's package-data listed configs/*.yaml only: a wheel (non-editable install) lacked the LIBERO
    configs of configs/libero/."""
    import fnmatch
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["flowrl"]
    shipped = [p.relative_to(root / "flowrl").as_posix() for p in (root / "flowrl" / "configs").rglob("*.yaml")]
    assert any("/libero/" in f"/{s}" for s in shipped)
    # setuptools' globs: '*' does not cross '/'
    missing = [s for s in shipped if not any(fnmatch.fnmatch(s, p) and s.count("/") == p.count("/") for p in patterns)]
    assert not missing, missing
