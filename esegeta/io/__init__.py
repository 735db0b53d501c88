"""Files in and out: loading inputs and models, streamed datasets, attribution stores, atomic writes."""
