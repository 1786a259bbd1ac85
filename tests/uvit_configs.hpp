// SPDX-License-Identifier: Apache-2.0
// Small U-ViT configurations shared by the whole-network tests (CPU, reference and CUDA backends):
// the official v0 and v1 layouts at toy sizes and a three-group layout.
#pragma once

#include "unidiffuser/nn/uvit_config.hpp"

namespace unidiffuser::testing {

namespace nn = unidiffuser::nn;

inline nn::UViTConfig v0_config() {
  return nn::UViTConfig::official("v0", 4, 2, 2, /*embed_dim=*/12, /*depth=*/3, /*heads=*/2, 2.0,
                                  /*qkv_bias=*/true, /*mlp_time_embed=*/true, 3, 2, 5);
}
inline nn::UViTConfig v1_config() {
  return nn::UViTConfig::official("v1", 4, 2, 2, 12, 3, 3, 2.0, false, false, 3, 3, 4);
}
// Three groups: an image latent, a text sequence and an "audio" sequence, each with its time.
inline nn::UViTConfig k3_config() {
  nn::UViTConfig c;
  c.version = "custom";
  c.embed_dim = 12;
  c.depth = 3;
  c.num_heads = 2;
  c.mlp_ratio = 2.0;
  c.qkv_bias = true;
  c.mlp_time_embed = true;
  c.time_names = {"time_img_embed", "time_text_embed", "time_audio_embed"};
  c.data_type_token = true;
  c.data_types = 3;
  nn::UViTComponent img{
      "img",         nn::ComponentKind::patched_image, 0, 0, 2, 4, 2, 0, 0, "patch_embed.proj",
      "decoder_pred"};
  nn::UViTComponent text{"text",    nn::ComponentKind::tokens, 1, 0, 0, 0, 0, 3, 4, "text_embed",
                         "text_out"};
  nn::UViTComponent audio{"audio",    nn::ComponentKind::tokens, 2, 0, 0, 0, 0, 2, 3, "audio_embed",
                          "audio_out"};
  c.components = {img, text, audio};
  c.validate();
  return c;
}

}  // namespace unidiffuser::testing
