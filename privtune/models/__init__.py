"""Model loading (embedded tiny SD or any diffusers SD checkpoint), LoRA injection and export."""
