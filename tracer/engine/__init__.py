"""The engine: record -> pair -> infer -> transfer -> compare -> diagnose -> report. It knows no model."""
