"""One training run: its specification (``fold.RunSpec``), fit-and-test (``training``), the result it writes
(``result.RunResult``) and the identity of its configuration (``identity``). The studies build on it."""
