"""Stage two and three: models, objective, the Accelerate loop, sampling and metrics."""
