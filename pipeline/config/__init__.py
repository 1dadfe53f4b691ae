"""Settings: value rules, the DPO option tables (plain data), `DPOConfig`, the params.yaml schema."""
