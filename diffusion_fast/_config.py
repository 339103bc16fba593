"""A read-only config readable as a dict and as attributes, shared by the models and the schedulers."""


class FrozenConfig(dict):
    """``config.num_train_timesteps`` and ``config["num_train_timesteps"]`` both work; writing is an error."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no field {name!r}") from None

    def _readonly(self, *args, **kwargs):
        raise TypeError("configs are read-only; build a new object with from_config(config, **changes)")

    __setitem__ = __delitem__ = update = pop = setdefault = _readonly

    def __reduce__(self):
        """copy.deepcopy and pickle rebuild the config whole: dict's default protocol sets items one by one, which
        the read-only config refuses (so ``copy.deepcopy(model)`` failed)."""
        return type(self), (dict(self),)
