"""The paper's baselines (SPEC 7), each with the model's predict interface."""
