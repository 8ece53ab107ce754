"""ggans: many GANs on emulated machines, trained as one stacked pytree in one jitted round."""

__version__ = "0.1.0"
