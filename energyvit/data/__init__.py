"""Image data: the embedded digits (digits), sets in memory (in_memory), datasets read from files
(files: image folders, WebDataset shards via webdataset, CIFAR batches, idx files) with their
transforms (transforms), a dataset opened for a run with its held-out split (splits), the run's
DataLoader (loader), pixel batches on the device (pixels) and the input pipeline's CPU rate
(throughput)."""
