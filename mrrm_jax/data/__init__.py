"""The backbone-free data path: media reading, records, examples, multi-response formatting, packing, the Grain pipeline, the offline tokenizer."""
