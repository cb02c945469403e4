"""What the evaluation scripts share: report writing (`report`), the generation metrics (`gfid`, `adm_npz`), the
Fashion-MNIST judge (`fmnist_classifier`, `fmnist_reference`), timing in turns (`timing`) and the decoders the
speed benchmarks build (`decoders`). Scripts import these, never each other."""
