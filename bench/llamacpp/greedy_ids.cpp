// Greedy decoding from token ids with llama.cpp's C API, logits of every position written out: checks that a GGUF
// from convert_qwen3moe_gguf.py computes what transformers computes on the same checkpoint (check_gguf.py compares).
// Why not llama-simple/llama-cli: they take text, and the random benchmark model's logits are only comparable by id.
//
// Build (check_gguf.py does): g++ -O2 -std=c++17 greedy_ids.cpp -I SRC/include -I SRC/ggml/include -L BUILD/bin
//                               -lllama -Wl,-rpath,BUILD/bin -o greedy_ids
// Usage: greedy_ids MODEL.gguf IDS(comma-separated) N_NEW LOGITS.f32 [N_GPU_LAYERS [FLASH_ATTN on|off|auto]]
//   stdout: one line "ids: a,b,c" (the N_NEW greedy ids); LOGITS.f32: float32 rows [P + N_NEW - 1, n_vocab], the
//   logits at positions 0 .. P + N_NEW - 2 of prompt + generated ids.
#include "llama.h"

#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <string>
#include <vector>

static void quiet(ggml_log_level level, const char * text, void *) {
    if (level >= GGML_LOG_LEVEL_ERROR) fputs(text, stderr);
}

int main(int argc, char ** argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: %s MODEL.gguf IDS N_NEW LOGITS.f32 [N_GPU_LAYERS [on|off|auto]]\n", argv[0]);
        return 2;
    }
    std::vector<llama_token> ids;
    std::stringstream list(argv[2]);
    for (std::string item; std::getline(list, item, ',');) ids.push_back(std::atoi(item.c_str()));
    const int n_new = std::atoi(argv[3]);
    llama_log_set(quiet, nullptr);
    llama_backend_init();

    llama_model_params mparams = llama_model_default_params();
    mparams.n_gpu_layers = argc > 5 ? std::atoi(argv[5]) : 0;
    llama_model * model = llama_model_load_from_file(argv[1], mparams);
    if (!model) { fprintf(stderr, "cannot load %s\n", argv[1]); return 1; }
    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));

    llama_context_params cparams = llama_context_default_params();
    cparams.n_ctx = ids.size() + n_new + 16;
    cparams.n_batch = cparams.n_ubatch = ids.size();
    cparams.n_threads = cparams.n_threads_batch = 1;  // one thread: the same sums in the same order every run
    // F32 KV cache and no flash attention (the CPU backend's runs in F16): an F32 GGUF then matches transformers'
    // float32 logits to ~3e-7 relative, so any layout error shows
    cparams.type_k = cparams.type_v = GGML_TYPE_F32;
    const std::string fa = argc > 6 ? argv[6] : "off";
    cparams.flash_attn_type = fa == "on" ? LLAMA_FLASH_ATTN_TYPE_ENABLED
                            : fa == "auto" ? LLAMA_FLASH_ATTN_TYPE_AUTO : LLAMA_FLASH_ATTN_TYPE_DISABLED;
    llama_context * ctx = llama_init_from_model(model, cparams);
    if (!ctx) { fprintf(stderr, "cannot create a context\n"); return 1; }

    FILE * out = fopen(argv[4], "wb");
    if (!out) { perror(argv[4]); return 1; }
    llama_batch batch = llama_batch_init(ids.size(), 0, 1);
    std::vector<llama_token> generated;
    int pos = 0;
    std::vector<llama_token> step = ids;
    while ((int) generated.size() < n_new) {
        batch.n_tokens = step.size();
        for (size_t i = 0; i < step.size(); ++i) {
            batch.token[i] = step[i];
            batch.pos[i] = pos + i;
            batch.n_seq_id[i] = 1;
            batch.seq_id[i][0] = 0;
            batch.logits[i] = 1;
        }
        if (llama_decode(ctx, batch) != 0) { fprintf(stderr, "llama_decode failed\n"); return 1; }
        pos += step.size();
        const float * last = nullptr;
        for (size_t i = 0; i < step.size(); ++i) {
            last = llama_get_logits_ith(ctx, i);
            fwrite(last, sizeof(float), n_vocab, out);
        }
        int best = 0;
        for (int v = 1; v < n_vocab; ++v) if (last[v] > last[best]) best = v;
        generated.push_back(best);
        step.assign(1, best);
    }
    fclose(out);
    printf("ids: ");
    for (size_t i = 0; i < generated.size(); ++i) printf(i ? ",%d" : "%d", generated[i]);
    printf("\n");
    llama_batch_free(batch);
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
