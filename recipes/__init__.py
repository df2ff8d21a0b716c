"""End-to-end Hydra recipes (`recipe=NAME`); installed as the package `lmd_lightning.recipes`."""
