"""The verifier service: owns sessions, batches their rounds, keeps the committed log in Redis."""
