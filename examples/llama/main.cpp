// The Llama 2 / 3 / 3.1 trainer: pretraining, continual pretraining and instruction tuning.
//   torchrun --standalone --no-python --nproc_per_node 2 build/examples/llama/llama_train
//       --config examples/configs/llama3_debug.toml [--training.steps 20]
#include "../trainer/trainer.hpp"

int main(int argc, char** argv) { return titan::examples::train_main(argc, argv, {"llama2", "llama3", "llama3.1"}); }
