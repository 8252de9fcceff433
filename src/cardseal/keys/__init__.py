"""Key providers (KMS) and signing keys, each behind a small interface."""
