// The Mistral trainer: pretraining, continual pretraining and instruction tuning.
//   torchrun --standalone --no-python --nproc_per_node 2 build/examples/mistral/mistral_train
//       --config examples/configs/mistral_debug.toml
#include "../trainer/trainer.hpp"

int main(int argc, char** argv) { return titan::examples::train_main(argc, argv, {"mistral"}); }
