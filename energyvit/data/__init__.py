"""Image data: the embedded digits (digits), sets in memory (in_memory), datasets read from files
(files: image folders, CIFAR batches, idx files) with their transforms (transforms), and a
dataset opened for a run with its held-out split (splits)."""
