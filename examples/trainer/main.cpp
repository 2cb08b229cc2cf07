// The trainer of every registered model family (examples/models/registry.hpp): pretraining,
// continual pretraining and instruction tuning of Llama 2, Llama 3 / 3.1, Mistral, ...
//   torchrun --standalone --no-python --nproc_per_node 2 build/examples/trainer/titan_train
//       --config examples/configs/llama3_debug.toml [--training.steps 20]
#include "trainer.hpp"

int main(int argc, char** argv) { return titan::examples::train_main(argc, argv); }
