"""Shared by every test folder: its presence puts tests/ on sys.path, so ``support`` (helpers that
spawned processes must import by module name) is importable from unit and integration tests alike."""
