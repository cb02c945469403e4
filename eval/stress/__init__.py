"""Stress harnesses: SIGKILLs during training (`kill_campaign`), resident memory on a large latent cache
(`cache_memory`), the app under concurrent load (`app_load`). Run as scripts; nothing but the tests imports them."""
