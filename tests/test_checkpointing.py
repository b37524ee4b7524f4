"""Activation checkpointing of the policy's layers: the same loss and gradients, layers rerun in the backward pass."""

from __future__ import annotations

import json

import pytest
import torch

from flowrl.models import Observation, Pi0Policy, from_pretrained, get_config


def _obs(c, B: int = 3, seed: int = 0) -> Observation:
    g = torch.Generator().manual_seed(seed)
    L = 6
    tok = torch.randint(1, c.vocab_size, (B, L), generator=g)
    tm = torch.ones(B, L, dtype=torch.bool)
    tm[0, 4:] = False  # padding: compaction and masks take part
    im = torch.ones(B, c.num_cameras, dtype=torch.bool)
    im[1, 0] = False
    return Observation(images=torch.rand(B, c.num_cameras, 3, c.image_size, c.image_size, generator=g) * 2 - 1,
                       image_masks=im, tokens=tok, token_masks=tm,
                       state=torch.randn(B, 5, generator=g) if c.variant == "pi0" else None)


def _loss_and_grads(policy: Pi0Policy, obs: Observation) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A loss through every trainable part: CFM losses (prefix + suffix), Flow-Noise chain log-prob, values."""
    c = policy.config
    g = torch.Generator().manual_seed(1)
    B, N, K = obs.images.shape[0], 2, 2
    H, D = c.action_horizon, c.action_dim
    actions = torch.randn(B, H, D, generator=g)
    noise, tau = torch.randn(B, N, H, D, generator=g), torch.rand(B, N, generator=g)
    chain = torch.randn(B, K + 1, H, D, generator=g)
    policy.zero_grad(set_to_none=True)
    cache = policy.encode_prefix(obs)
    loss = (policy.cfm_losses(cache, actions, noise, tau).mean()
            + 1e-2 * policy.chain_logprob(cache, chain, mode="noise", reduce="mean").mean()
            + policy.value(cache, detach=False).square().mean()
            + policy.value(cache, side="expert", detach=False).square().mean())
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in policy.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("variant, mode", [("pi0", "vlm"), ("pi0", "expert"), ("pi0", "all"), ("pi05", "all")])
def test_checkpointing_gives_the_same_loss_and_gradients(variant, mode):
    torch.manual_seed(0)
    c = get_config("tiny", variant=variant, num_cameras=2, action_horizon=6, vocab_size=64, dtype="float32")
    policy = Pi0Policy(c).train()  # everything trainable (freeze "none")
    obs = _obs(c)
    ref_loss, ref = _loss_and_grads(policy, obs)
    missing = [n for n, p in policy.named_parameters() if n not in ref]
    assert not missing, missing  # the loss reaches every parameter

    calls = {"vlm": 0, "expert": 0, "siglip": 0}  # pre-hooks: a recompute stops after its last saved tensor
    hooks = [policy.vlm.layers[0].mlp.register_forward_pre_hook(lambda *a: calls.__setitem__("vlm", calls["vlm"] + 1)),
             policy.expert.layers[-1].mlp.register_forward_pre_hook(
                 lambda *a: calls.__setitem__("expert", calls["expert"] + 1)),
             policy.vision_tower.vision_model.encoder.layers[0].register_forward_pre_hook(
                 lambda *a: calls.__setitem__("siglip", calls["siglip"] + 1))]
    _loss_and_grads(policy, obs)
    plain = dict(calls)
    policy.set_activation_checkpointing(mode)
    assert policy.config.activation_checkpointing == mode
    for k in calls:
        calls[k] = 0
    loss, grads = _loss_and_grads(policy, obs)
    for h in hooks:
        h.remove()

    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    assert grads.keys() == ref.keys()
    for n in ref:
        torch.testing.assert_close(grads[n], ref[n], rtol=1e-6, atol=1e-7, msg=lambda m, n=n: f"{n}: {m}")
    # the checkpointed layers ran again in the backward pass, the others did not
    vlm_on, expert_on = mode in ("vlm", "all"), mode in ("expert", "all")
    assert calls["vlm"] == plain["vlm"] * (2 if vlm_on else 1)
    assert calls["siglip"] == plain["siglip"] * (2 if vlm_on else 1)
    # the expert's layers run in 3 suffix passes (CFM, chain, expert value) and, for π0, in the prefix pass
    # (the state token), which "vlm" checkpoints
    assert plain["expert"] == 3 + (variant == "pi0")
    assert calls["expert"] == plain["expert"] + 3 * expert_on + (vlm_on and variant == "pi0")


def test_checkpointing_is_off_in_eval_and_without_grad():
    c = get_config("tiny", num_cameras=2, action_horizon=6, vocab_size=64, activation_checkpointing="all")
    policy = Pi0Policy(c)
    obs = _obs(c)
    policy.train()
    assert policy._checkpointing("vlm") and policy._checkpointing("expert")
    with torch.no_grad():
        assert not policy._checkpointing("vlm")
    policy.eval()
    assert not policy._checkpointing("expert")
    res = policy.sample_actions(obs, num_steps=2, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(res.actions).all()


def test_config_field_round_trips_and_old_configs_load(tmp_path):
    c = get_config("tiny", num_cameras=1, activation_checkpointing="vlm")
    Pi0Policy(c).save_pretrained(tmp_path / "a")
    assert from_pretrained(str(tmp_path / "a")).config.activation_checkpointing == "vlm"
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    del cfg["activation_checkpointing"]  # a checkpoint written before the option existed
    (tmp_path / "a" / "config.json").write_text(json.dumps(cfg))
    assert from_pretrained(str(tmp_path / "a")).config.activation_checkpointing == "none"
    with pytest.raises(ValueError, match="activation_checkpointing"):
        get_config("tiny", activation_checkpointing="sometimes")


def test_trainer_option_reaches_the_policy():
    from flowrl.config import ConfigError, load_config
    from flowrl.train import build_env, build_policy

    cfg = load_config(None, ["model.activation_checkpointing=all", "model.overrides.action_horizon=10"])
    policy = build_policy(cfg, build_env(cfg))
    assert policy.config.activation_checkpointing == "all"
    with pytest.raises(ConfigError, match=r"model\.activation_checkpointing"):
        load_config(None, ["model.activation_checkpointing=yes"])
