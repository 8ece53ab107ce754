"""One GAN on one machine: its state, losses and a single local training step.

Everything here is for a single replica; :mod:`ggans.replicas` stacks N of them and
:mod:`ggans.training` vmaps the step. The step follows the TF MNIST GAN (reference-notes
section 1): a discriminator update, then a generator update, each with fresh noise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from ggans import impls, models
from ggans.models import l2_penalty

LOSSES = ("wgan_gp", "nonsat")
PyTree = Any


@dataclass(frozen=True)
class GanSpec:
    """Everything static about one GAN: architecture, loss and optimiser settings."""

    arch: str = "paper"
    loss: str = "wgan_gp"
    gp_weight: float = 1.0
    noise_dim: int = 128
    batch_size: int = 32
    g_lr: float = 1e-3
    d_lr: float = 1e-4
    beta1: float = 0.5
    beta2: float = 0.999
    weight_decay: float = 2.5e-5
    bn_momentum: float = 0.999
    impl: str = "auto"  # the layer set (ggans.impls): auto | patches | flax | cpu | ...
    precision: str = "default"  # the layers' products: default | highest | bf16
    # [H, W, C] of the images: set from the dataset when a run starts (not a setting)
    image_shape: tuple[int, int, int] = field(default=(28, 28, 1), metadata={"derived": True})

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:  # the step tests for wgan_gp: a typo would train nonsat
            raise ValueError(f"loss={self.loss!r}: must be one of {', '.join(LOSSES)}")

    @property
    def architecture(self) -> models.Architecture:
        return models.get(self.arch)

    @property
    def generator(self) -> nn.Module:
        return self.architecture.generator(self)

    @property
    def discriminator(self) -> nn.Module:
        return self.architecture.discriminator(self)

    @property
    def g_adam(self) -> dict[str, float]:
        """G's optimiser: ``optax.adam(**g_adam)``."""
        return {"learning_rate": self.g_lr, "b1": self.beta1, "b2": self.beta2}

    @property
    def d_adam(self) -> dict[str, float]:
        """D's optimiser: ``optax.adam(**d_adam)``."""
        return {"learning_rate": self.d_lr, "b1": self.beta1, "b2": self.beta2}


def _adam_step(impl: impls.Impl, adam: dict[str, float], grads, state, params):
    """``optax.adam(**adam)``'s update applied to ``params``, or the layer set's fused step."""
    if impl.adam_step is not None:
        return impl.adam_step(grads, state, params, **adam)
    return impls.apply_optimizer(optax.adam(**adam), grads, state, params)


class GanState(struct.PyTreeNode):
    """One machine's GAN; stacked, every leaf gains a leading machine axis. ``g_state`` and
    ``d_state`` hold the networks' other variable collections by name (the paper's generator:
    ``batch_stats``, its running means and variances; its discriminator: none)."""

    g_params: PyTree
    g_state: dict[str, PyTree]
    d_params: PyTree
    d_state: dict[str, PyTree]
    g_opt: PyTree
    d_opt: PyTree
    exchange: PyTree = None  # what the exchange keeps between rounds (compression's residual)


def _apply(module: nn.Module, params, collections: dict, x, **kwargs):
    """``module(x)`` with its collections updated: (output, new collections)."""
    variables = {"params": params, **collections}
    if not collections:
        return module.apply(variables, x, **kwargs), {}
    out, new = module.apply(variables, x, mutable=list(collections), **kwargs)
    return out, dict(new)


class StepMetrics(struct.PyTreeNode):
    """Training signals of one step (scalars; [K] over a round, [N, K] over replicas)."""

    g_loss: jax.Array
    d_loss: jax.Array
    wasserstein: jax.Array  # mean D(real) - mean D(fake)
    gradient_penalty: jax.Array


def init_gan(spec: GanSpec, key: jax.Array) -> GanState:
    """Fresh weights (TF1 initialisers) and Adam states for one machine."""
    g_key, d_key = jax.random.split(key)
    arch = spec.architecture
    g_vars = spec.generator.init(g_key, jnp.zeros((1, spec.noise_dim)), train=False)
    d_vars = spec.discriminator.init(d_key, jnp.zeros((1, *spec.image_shape)))
    return GanState(
        g_params=g_vars["params"],
        g_state={c: g_vars[c] for c in arch.g_collections},
        d_params=d_vars["params"],
        d_state={c: d_vars[c] for c in arch.d_collections},
        g_opt=optax.adam(**spec.g_adam).init(g_vars["params"]),
        d_opt=optax.adam(**spec.d_adam).init(d_vars["params"]),
    )


def generate(spec: GanSpec, state: GanState, z: jax.Array) -> jax.Array:
    """Samples in eval mode (batch-norm running statistics): z [S, noise] -> [S, H, W, C]."""
    variables = {"params": state.g_params, **state.g_state}
    return spec.generator.apply(variables, z, train=False)


def _gradient_penalty(d_apply, real, fake, key) -> jax.Array:
    """TF-GAN's wasserstein_gradient_penalty: mean (sqrt(|grad D(x_hat)|^2 + 1e-10) - 1)^2."""
    alpha = jax.random.uniform(key, (real.shape[0], 1, 1, 1))
    x_hat = real + alpha * (fake - real)
    grads = jax.grad(lambda x: jnp.sum(d_apply(x)))(x_hat)
    slopes = jnp.sqrt(jnp.sum(jnp.square(grads), axis=(1, 2, 3)) + 1e-10)
    return jnp.mean(jnp.square(slopes - 1.0))


def train_step(
    spec: GanSpec, state: GanState, key: jax.Array, real: jax.Array
) -> tuple[GanState, StepMetrics]:
    """One local iteration for one machine: a D update, then a G update.

    ``real`` is a minibatch [B, H, W, C] already in the model's range.
    """
    gen, disc, arch = spec.generator, spec.discriminator, spec.architecture
    impl = impls.get(spec.impl)
    z_d, z_g, gp_key = jax.random.split(key, 3)
    batch = real.shape[0]

    def g_forward(g_params, z):
        return _apply(gen, g_params, state.g_state, z, train=True)

    fake, _ = g_forward(state.g_params, jax.random.normal(z_d, (batch, spec.noise_dim)))
    fake = jax.lax.stop_gradient(fake)

    def d_loss_fn(d_params):
        def d_apply(x):
            return _apply(disc, d_params, state.d_state, x)[0]

        logits, d_state = _apply(disc, d_params, state.d_state, jnp.concatenate([real, fake]))
        d_real, d_fake = logits[:batch], logits[batch:]
        wasserstein = jnp.mean(d_real) - jnp.mean(d_fake)
        if spec.loss == "wgan_gp":
            gp = _gradient_penalty(d_apply, real, fake, gp_key)
            loss = -wasserstein + spec.gp_weight * gp
        else:
            gp = jnp.zeros(())
            loss = jnp.mean(jax.nn.softplus(-d_real)) + jnp.mean(jax.nn.softplus(d_fake))
        loss = loss + spec.weight_decay * l2_penalty(d_params, arch.d_decays)
        return loss, (wasserstein, gp, d_state)

    d_value_and_grad = jax.value_and_grad(d_loss_fn, has_aux=True)
    if impl.wrap_d_grad is not None:
        d_value_and_grad = impl.wrap_d_grad(d_value_and_grad)
    (d_loss, (wasserstein, gp, d_state)), d_grads = d_value_and_grad(state.d_params)
    d_params, d_opt = _adam_step(impl, spec.d_adam, d_grads, state.d_opt, state.d_params)

    def g_loss_fn(g_params):
        fake, g_state = g_forward(g_params, jax.random.normal(z_g, (batch, spec.noise_dim)))
        d_fake, _ = _apply(disc, d_params, d_state, fake)
        wgan = spec.loss == "wgan_gp"
        loss = -jnp.mean(d_fake) if wgan else jnp.mean(jax.nn.softplus(-d_fake))
        loss = loss + spec.weight_decay * l2_penalty(g_params, arch.g_decays)
        return loss, g_state

    (g_loss, g_state), g_grads = jax.value_and_grad(g_loss_fn, has_aux=True)(state.g_params)
    g_params, g_opt = _adam_step(impl, spec.g_adam, g_grads, state.g_opt, state.g_params)

    new_state = state.replace(
        g_params=g_params,
        g_state=g_state,
        d_params=d_params,
        d_state=d_state,
        g_opt=g_opt,
        d_opt=d_opt,
    )
    return new_state, StepMetrics(g_loss, d_loss, wasserstein, gp)
