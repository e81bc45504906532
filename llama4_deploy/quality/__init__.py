"""Quality of a built bundle: parity against transformers (verify), the comparator, evaluation."""
