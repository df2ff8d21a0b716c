"""Hydra configuration groups of lmd_lightning; installed as the package `lmd_lightning.configs`."""
