"""Running a model: the compiled pre-fill, gather and decode programs, the Generator, offload, sampling."""
