"""Built-in experiments (installed as `nagjax_experiments`); every module here is imported by
`nagjax.registry.load_experiments`, so a new file registers its experiments by being here."""
