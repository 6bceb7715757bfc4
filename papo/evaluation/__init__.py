"""Evaluation: ``papo eval`` (benchmarks, masked-image perception gaps, suites), pass@k, scoring saved
responses, and the error analysis of responses."""
