# SPDX-License-Identifier: Apache-2.0
# Command-line tests: unidiffuser-sample runs every mode end to end on the golden tiny model, and
# every bad input of every program (sample, golden, bench, oracle_demo) ends with exit code 1 and
# one line "<program>: error: <message>" naming the option or file (checked by cli_expect.cmake).
set(_tiny ${CMAKE_CURRENT_SOURCE_DIR}/data/golden/uvit_v1_tiny.safetensors)
set(_tiny_cond ${CMAKE_CURRENT_SOURCE_DIR}/data/tiny_conditions.safetensors)
set(_cli ${CMAKE_CURRENT_BINARY_DIR}/cli)
set(_sample $<TARGET_FILE:unidiffuser-sample>)
set(_run_tiny ${_sample} --checkpoint ${_tiny} --prefix param/)
file(MAKE_DIRECTORY ${_cli})

foreach(mode joint t2i i2t i t i2t2i t2i2t)
  add_test(NAME sample_cli_${mode}
           COMMAND unidiffuser-sample --checkpoint ${_tiny} --prefix param/ --mode ${mode} --steps 6 --batch 2
                   --conditions ${_tiny_cond}
                   --out ${CMAKE_CURRENT_BINARY_DIR}/sample_${mode}.safetensors --quiet)
endforeach()

# --dtype bf16: the run ends well in bf16 (where the build and CPU have it) or in f32 with a note
add_test(NAME sample_cli_t2i_bf16
         COMMAND unidiffuser-sample --checkpoint ${_tiny} --prefix param/ --mode t2i --steps 6
                 --batch 2 --conditions ${_tiny_cond} --dtype bf16
                 --out ${CMAKE_CURRENT_BINARY_DIR}/sample_t2i_bf16.safetensors --quiet)

# cli_expect(NAME RC <code> [STDERR re] [STDOUT re] [FORBID re] [INPUT file] [CREATES file]
#            [FILE_CONTAINS text] [UNCHANGED a|b] [HOSTILE] COMMAND ...)
# Exit code 1 also requires stderr to be exactly one line. HOSTILE: needs the
# files cli_make_hostile writes into ${_cli}.
function(cli_expect name)
  cmake_parse_arguments(PARSE_ARGV 1 X "HOSTILE"
                        "RC;STDERR;STDOUT;FORBID;INPUT;CREATES;FILE_CONTAINS;UNCHANGED" "COMMAND")
  set(defs -DEXPECT_RC=${X_RC})
  foreach(k STDERR STDOUT FORBID INPUT CREATES FILE_CONTAINS UNCHANGED)
    if(DEFINED X_${k})
      list(APPEND defs "-D${k}=${X_${k}}")
    endif()
  endforeach()
  if(X_RC EQUAL 1)
    list(APPEND defs -DONE_LINE=ON)
  endif()
  add_test(NAME ${name}
           COMMAND ${CMAKE_COMMAND} ${defs} -P ${CMAKE_CURRENT_SOURCE_DIR}/cli_expect.cmake --
                   ${X_COMMAND})
  set_tests_properties(${name} PROPERTIES TIMEOUT 120)
  if(X_HOSTILE)
    set_tests_properties(${name} PROPERTIES FIXTURES_REQUIRED cli_hostile)
  endif()
endfunction()

# Hostile inputs made at test time from the tiny checkpoint (tests/cli_make_hostile.cpp).
add_executable(cli_make_hostile cli_make_hostile.cpp)
target_link_libraries(cli_make_hostile PRIVATE unidiffuser_project_options)
add_test(NAME cli_make_hostile COMMAND cli_make_hostile ${_tiny} ${_tiny_cond} ${_cli}
                                       ${CMAKE_CURRENT_SOURCE_DIR}/data/golden)
set_tests_properties(cli_make_hostile PROPERTIES FIXTURES_SETUP cli_hostile)

set(_err "unidiffuser-sample: error: ")
set(_opt "${_err}command line: ")
# ---- unidiffuser-sample: options ---------------------------------------------------------------
cli_expect(sample_cli_missing_conditions RC 1
           STDERR "${_opt}--conditions: required for mode t2i"
           COMMAND ${_run_tiny} --mode t2i --out ${_cli}/x.safetensors)
cli_expect(sample_cli_bad_checkpoint RC 1
           STDERR "${_err}input file: --checkpoint /nonexistent.safetensors: no such file"
           COMMAND ${_sample} --checkpoint /nonexistent.safetensors --mode joint --out x.safetensors)
cli_expect(sample_cli_wrong_prefix RC 1 STDERR "${_err}.*uvit_v1_tiny.safetensors"
           COMMAND ${_sample} --checkpoint ${_tiny} --mode joint --out ${_cli}/x.safetensors)
cli_expect(cli_sample_unknown_option RC 1 STDERR "${_opt}--bogus: unknown option"
           COMMAND ${_run_tiny} --mode joint --out ${_cli}/x.safetensors --bogus 7)
cli_expect(cli_sample_missing_value RC 1 STDERR "${_opt}--steps: missing value"
           COMMAND ${_run_tiny} --mode joint --out ${_cli}/x.safetensors --steps)
cli_expect(cli_sample_missing_value_before_option RC 1 STDERR "${_opt}--seed: missing value"
           COMMAND ${_run_tiny} --mode joint --seed --out ${_cli}/x.safetensors)
cli_expect(cli_sample_repeated_option RC 1 STDERR "${_opt}--steps: given more than once"
           COMMAND ${_run_tiny} --mode joint --steps 2 --steps 3 --out ${_cli}/x.safetensors)
cli_expect(cli_sample_steps_wrap RC 1
           STDERR "${_opt}--steps: integer out of range. expected 1..100000, got '4294967297'"
           COMMAND ${_run_tiny} --mode joint --out ${_cli}/x.safetensors --steps 4294967297)
cli_expect(cli_sample_steps_zero RC 1
           STDERR "${_opt}--steps: integer out of range. expected 1..100000, got '0'"
           COMMAND ${_run_tiny} --mode joint --out ${_cli}/x.safetensors --steps 0)
cli_expect(cli_sample_order_wrap RC 1
           STDERR "${_opt}--order: integer out of range. expected 1..3, got '4294967299'"
           COMMAND ${_run_tiny} --mode joint --out ${_cli}/x.safetensors --order 4294967299)
cli_expect(cli_sample_seed_2_64 RC 1
           STDERR "${_opt}--seed: integer out of range. expected 0..18446744073709551615, got '18446744073709551616'"
           COMMAND ${_run_tiny} --mode joint --out ${_cli}/x.safetensors --seed 18446744073709551616)
cli_expect(cli_sample_seed_negative RC 1 STDERR "${_opt}--seed: not an integer.* got '-1'"
           COMMAND ${_run_tiny} --mode joint --out ${_cli}/x.safetensors --seed -1)
cli_expect(cli_sample_seed_junk RC 1 STDERR "${_opt}--seed: not an integer.* got '12x'"
           COMMAND ${_run_tiny} --mode joint --out ${_cli}/x.safetensors --seed 12x)
cli_expect(cli_sample_seed_max RC 0
           CREATES ${_cli}/seed_max.safetensors FILE_CONTAINS "18446744073709551615"
           COMMAND ${_run_tiny} --mode joint --steps 2 --quiet --seed 18446744073709551615
                   --out ${_cli}/seed_max.safetensors)
cli_expect(cli_sample_threads_5000 RC 1 STDERR "${_opt}--threads: integer out of range. expected 0..[0-9]+, got '5000'"
           COMMAND ${_run_tiny} --mode joint --out ${_cli}/x.safetensors --threads 5000)
cli_expect(cli_sample_batch_zero RC 1 STDERR "${_opt}--batch: integer out of range. expected 1..4096"
           COMMAND ${_run_tiny} --mode joint --out ${_cli}/x.safetensors --batch 0)
cli_expect(cli_sample_data_type RC 1 STDERR "${_opt}--data-type: integer out of range. expected 0..1"
           COMMAND ${_run_tiny} --mode joint --out ${_cli}/x.safetensors --data-type 2)
cli_expect(cli_sample_scale_nan RC 1 STDERR "${_opt}--scale: not a finite number"
           COMMAND ${_run_tiny} --mode joint --out ${_cli}/x.safetensors --scale nan)
cli_expect(cli_sample_guidance_rescale RC 0 CREATES ${_cli}/rescaled.safetensors
           FILE_CONTAINS "guidance_rescale"
           COMMAND ${_run_tiny} --mode joint --steps 4 --guidance-rescale 0.7 --quiet
                   --out ${_cli}/rescaled.safetensors)
cli_expect(cli_sample_guidance_interval RC 0 CREATES ${_cli}/interval.safetensors
           FILE_CONTAINS "guidance_interval"
           COMMAND ${_run_tiny} --mode joint --steps 4 --guidance-interval 0.5,1 --quiet
                   --out ${_cli}/interval.safetensors)
cli_expect(cli_sample_guidance_references RC 0 CREATES ${_cli}/separate.safetensors
           FILE_CONTAINS "guidance_references"
           COMMAND ${_run_tiny} --mode joint --steps 4 --guidance-references separate --quiet
                   --out ${_cli}/separate.safetensors)
cli_expect(cli_sample_guidance_references_value RC 1
           STDERR "${_opt}--guidance-references: unknown value. expected batched"
           COMMAND ${_run_tiny} --mode joint --out ${_cli}/x.safetensors --guidance-references both)
cli_expect(cli_sample_guidance_interval_order RC 1
           STDERR "${_opt}--guidance-interval: expected LO <= HI"
           COMMAND ${_run_tiny} --mode joint --out ${_cli}/x.safetensors --guidance-interval 0.8,0.2)
cli_expect(cli_sample_guidance_interval_form RC 1
           STDERR "${_opt}--guidance-interval: expected LO,HI"
           COMMAND ${_run_tiny} --mode joint --out ${_cli}/x.safetensors --guidance-interval 0.5)
cli_expect(cli_sample_guidance_rescale_range RC 1 STDERR "${_opt}--guidance-rescale: number out of range"
           COMMAND ${_run_tiny} --mode joint --out ${_cli}/x.safetensors --guidance-rescale 2)
cli_expect(cli_sample_sampler RC 1 STDERR "${_opt}--sampler: unknown value. expected dpm_solver"
           COMMAND ${_run_tiny} --mode joint --out ${_cli}/x.safetensors --sampler euler)
# ---- unidiffuser-sample: a three-group layout (any task through --task) ------------------------
set(_k3 ${_sample} --checkpoint ${_cli}/k3.safetensors --steps 3 --batch 2 --quiet
        --conditions ${_cli}/k3_conditions.safetensors)
foreach(case "t2i;img|text;img" "one_to_many;img,audio|text;audio" "many_to_one;text|img,audio;text"
             "chain;text|img > img|text;img" "joint;img,text,audio;audio" "marginal;audio;audio")
  list(GET case 0 name)
  list(GET case 1 spec)
  list(GET case 2 wrote)
  cli_expect(sample_cli_k3_${name} RC 0 HOSTILE CREATES ${_cli}/k3_${name}.safetensors
             FILE_CONTAINS "\"${wrote}\""
             COMMAND ${_k3} --task "${spec}" --out ${_cli}/k3_${name}.safetensors)
endforeach()
# six groups (the program samples layouts of 1 to 8) and nine (refused by name)
set(_k6 ${_sample} --checkpoint ${_cli}/k6.safetensors --steps 3 --batch 2 --quiet
        --conditions ${_cli}/k6_conditions.safetensors)
cli_expect(sample_cli_k6_joint RC 0 HOSTILE CREATES ${_cli}/k6_joint.safetensors
           FILE_CONTAINS "\"g5\""
           COMMAND ${_k6} --task "img,text,audio,g3,g4,g5" --out ${_cli}/k6_joint.safetensors)
cli_expect(sample_cli_k6_many_to_one RC 0 HOSTILE CREATES ${_cli}/k6_m2o.safetensors
           FILE_CONTAINS "\"g4\""
           COMMAND ${_k6} --task "g4|img,g3,g5" --out ${_cli}/k6_m2o.safetensors)
cli_expect(sample_cli_k9_refused RC 1 HOSTILE
           STDERR "layout of 9 timestep groups: this program samples layouts of 1 to 8 groups"
           COMMAND ${_sample} --checkpoint ${_cli}/k9.safetensors --task img --out ${_cli}/x.safetensors)
cli_expect(sample_cli_k3_mode RC 1 HOSTILE
           STDERR "${_opt}--mode: the official modes need a two-group layout; this checkpoint has 3 groups"
           COMMAND ${_k3} --mode t2i --out ${_cli}/x.safetensors)
cli_expect(sample_cli_k3_unknown_group RC 1 HOSTILE
           STDERR "${_opt}--task: unknown group 'video'; the groups are 0 = time_img_embed .img.; 1 = time_text_embed .text.; 2 = time_audio_embed .audio."
           COMMAND ${_k3} --task "video|text" --out ${_cli}/x.safetensors)
cli_expect(sample_cli_k3_twice RC 1 HOSTILE STDERR "${_opt}--task: stage 'img|img': .*listed twice"
           COMMAND ${_k3} --task "img|img" --out ${_cli}/x.safetensors)
cli_expect(sample_cli_k3_no_conditions RC 1 HOSTILE
           STDERR "${_opt}--conditions: required for task 'img.text'"
           COMMAND ${_sample} --checkpoint ${_cli}/k3.safetensors --task "img|text"
                   --out ${_cli}/x.safetensors)
cli_expect(sample_cli_mode_and_task RC 1 STDERR "${_opt}--mode: give --mode or --task, not both"
           COMMAND ${_run_tiny} --mode joint --task img --out ${_cli}/x.safetensors)
cli_expect(sample_cli_no_mode RC 1 STDERR "${_opt}--mode: required: give --mode .official modes. or --task"
           COMMAND ${_run_tiny} --out ${_cli}/x.safetensors)
cli_expect(sample_cli_task_official RC 0 CREATES ${_cli}/task_t2i.safetensors FILE_CONTAINS "\"clip_img\""
           COMMAND ${_run_tiny} --task "img|text" --steps 3 --batch 2 --quiet --conditions ${_tiny_cond}
                   --out ${_cli}/task_t2i.safetensors)

# ---- unidiffuser-sample: files -----------------------------------------------------------------
cli_expect(cli_sample_config_array RC 1 HOSTILE
           STDERR "${_err}config: --config .*config_array.json: config JSON. expected an object .*, got array"
           COMMAND ${_run_tiny} --mode joint --out ${_cli}/x.safetensors --config ${_cli}/config_array.json)
cli_expect(cli_sample_checkpoint_directory RC 1 STDERR "${_err}input file: --checkpoint /tmp: not a regular file"
           COMMAND ${_sample} --checkpoint /tmp --mode joint --out ${_cli}/x.safetensors)
cli_expect(cli_sample_embed_dim_2_26 RC 1 HOSTILE STDERR "${_err}check_config_bounds: embed_dim: value out of range. expected .1, [0-9]+., got 67108864"
           COMMAND ${_sample} --checkpoint ${_cli}/embed_huge.safetensors --prefix param/ --mode joint
                   --out ${_cli}/x.safetensors)
cli_expect(cli_sample_text_tokens_2_40 RC 1 HOSTILE
           STDERR "${_err}check_config_bounds: text.length: value out of range. expected .1, [0-9]+., got 1099511627776"
           COMMAND ${_sample} --checkpoint ${_cli}/text_tokens_huge.safetensors --prefix param/
                   --mode joint --out ${_cli}/x.safetensors)
cli_expect(cli_sample_out_is_checkpoint RC 1 HOSTILE
           STDERR "${_err}output file: --out .*ckpt_copy.safetensors: is the same file as --checkpoint"
           UNCHANGED "${_cli}/ckpt_copy.safetensors|${_tiny}"
           COMMAND ${_sample} --checkpoint ${_cli}/ckpt_copy.safetensors --prefix param/ --mode joint
                   --steps 2 --out ${_cli}/../cli/./ckpt_copy.safetensors)
cli_expect(cli_sample_out_is_conditions RC 1 HOSTILE
           STDERR "${_err}output file: --out .*cond_copy.safetensors: is the same file as --conditions"
           UNCHANGED "${_cli}/cond_copy.safetensors|${_tiny_cond}"
           COMMAND ${_run_tiny} --mode t2i --batch 2 --steps 2 --conditions ${_cli}/cond_copy.safetensors
                   --out ${_cli}/cond_copy.safetensors)
# Fails before sampling: 100000 steps would not finish in the timeout, and no progress appears.
cli_expect(cli_sample_out_missing_directory RC 1 FORBID "step"
           STDERR "${_err}output file: --out /nonexistent-dir/x.safetensors: the output directory /nonexistent-dir does not exist"
           COMMAND ${_run_tiny} --mode joint --steps 100000 --out /nonexistent-dir/x.safetensors)
cli_expect(cli_sample_nan_weight RC 1 HOSTILE STDERR "${_err}load_checkpoint: .*nan_weight.safetensors: non-finite weights .NaN or Inf. in 1 tensor.s.: param/pos_embed"
           COMMAND ${_sample} --checkpoint ${_cli}/nan_weight.safetensors --prefix param/ --mode joint
                   --steps 2 --out ${_cli}/x.safetensors)
cli_expect(cli_sample_nan_weight_allowed RC 2 HOSTILE CREATES ${_cli}/nan_out.safetensors
           STDERR "${_err}the output holds NaN or infinite values .img: [1-9][0-9]* of 256, clip_img: [1-9][0-9]* of 12, text: [1-9][0-9]* of 48.. the file was written anyway"
           COMMAND ${_sample} --checkpoint ${_cli}/nan_weight.safetensors --prefix param/ --mode joint
                   --steps 2 --quiet --allow-nonfinite-weights --out ${_cli}/nan_out.safetensors)
cli_expect(cli_sample_condition_transposed RC 1 HOSTILE
           STDERR "${_err}conditions: .*cond_transposed.safetensors: text: condition shape. expected .6, 8. .one sample. or .1, 6, 8. .the batch., got .8, 6."
           COMMAND ${_run_tiny} --mode t2i --steps 2 --conditions ${_cli}/cond_transposed.safetensors
                   --out ${_cli}/x.safetensors)
cli_expect(cli_sample_condition_i64 RC 1 HOSTILE
           STDERR "${_err}conditions: .*cond_i64.safetensors: text: condition dtype. expected F32, F16, BF16 or F64, got I64"
           COMMAND ${_run_tiny} --mode t2i --steps 2 --conditions ${_cli}/cond_i64.safetensors
                   --out ${_cli}/x.safetensors)

# ---- unidiffuser-golden ------------------------------------------------------------------------
set(_golden $<TARGET_FILE:unidiffuser-golden>)
cli_expect(cli_golden_unknown_option RC 1
           STDERR "unidiffuser-golden: error: command line: --bogus: unknown option"
           COMMAND ${_golden} --bogus ${CMAKE_CURRENT_SOURCE_DIR}/data/golden)
cli_expect(cli_golden_too_many_arguments RC 1
           STDERR "unidiffuser-golden: error: command line: 'b': too many arguments"
           COMMAND ${_golden} a b)
cli_expect(cli_golden_missing_directory RC 1
           STDERR "unidiffuser-golden: error: command line: GOLDEN_DIR: missing argument"
           COMMAND ${_golden})
# a reference without a tolerance in the file's checks fails (it is never skipped), and a run in
# which no check passed fails
cli_expect(cli_golden_missing_tolerance RC 1 HOSTILE
           STDOUT "no tolerance 'embedding' in the file's checks  FAIL"
           STDERR "unidiffuser-golden: error: golden: .*: [0-9]+ of [0-9]+ checks failed"
           COMMAND ${_golden} ${_cli}/golden_no_tolerance)
cli_expect(cli_golden_nothing_recognised RC 1 HOSTILE
           STDERR "unidiffuser-golden: error: golden directory: .*golden_unknown: no golden file recognised"
           COMMAND ${_golden} ${_cli}/golden_unknown)
cli_expect(cli_golden_unreadable_directory RC 1
           STDERR "unidiffuser-golden: error: golden directory: /nonexistent-dir: cannot read the directory"
           COMMAND ${_golden} /nonexistent-dir)

# ---- unidiffuser-bench -------------------------------------------------------------------------
if(UNIDIFFUSER_BUILD_BENCHMARKS)
  set(_bench $<TARGET_FILE:unidiffuser-bench>)
  set(_berr "unidiffuser-bench: error: command line: ")
  set(_tiny_uvit uvit --embed 64 --depth 4 --heads 4 --latent 4x8x8 --patch 2 --text 6x8 --clip 12)
  cli_expect(cli_bench_uvit_runs RC 0 STDOUT "\"ms_median\""
             COMMAND ${_bench} ${_tiny_uvit} --repeat 1 --threads 1)
  cli_expect(cli_bench_uvit_unknown_option RC 1 STDERR "${_berr}--bogus: unknown option"
             COMMAND ${_bench} ${_tiny_uvit} --bogus 7)
  cli_expect(cli_bench_uvit_dtype RC 1 STDERR "${_berr}--dtype: unknown value"
             COMMAND ${_bench} ${_tiny_uvit} --dtype f16)
  # bf16 where the build and CPU have it, else f32 with a note (both end well)
  cli_expect(cli_bench_uvit_bf16 RC 0 STDOUT "\"dtype\": \"(bf16|f32)\""
             COMMAND ${_bench} ${_tiny_uvit} --dtype bf16 --repeat 1 --threads 1)
  # oneDNN told the CPU has no bf16 instructions (ONEDNN_MAX_CPU_ISA): the f32 fallback's note
  cli_expect(cli_bench_uvit_bf16_fallback RC 0
             STDERR "unidiffuser-bench: note: --dtype bf16 needs a oneDNN build on a CPU with AVX512-BF16 or AMX. this run computes fp32"
             STDOUT "\"dtype\": \"f32\""
             COMMAND ${CMAKE_COMMAND} -E env ONEDNN_MAX_CPU_ISA=AVX512_CORE
                     ${_bench} ${_tiny_uvit} --dtype bf16 --repeat 1 --threads 1)
  cli_expect(cli_bench_train_bf16 RC 1
             STDERR "unidiffuser-bench: error: unidiffuser-bench train: --dtype bf16: bf16 is an inference mode"
             COMMAND ${_bench} train --embed 64 --depth 4 --heads 4 --latent 4x8x8 --patch 2
                     --text 6x8 --clip 12 --dtype bf16)
  cli_expect(cli_bench_uvit_missing_value RC 1 STDERR "${_berr}--repeat: missing value"
             COMMAND ${_bench} ${_tiny_uvit} --repeat)
  cli_expect(cli_bench_uvit_embed_wrap RC 1
             STDERR "${_berr}--embed: integer out of range. expected 1..65536, got '18446744073709551680'"
             COMMAND ${_bench} uvit --embed 18446744073709551680)
  cli_expect(cli_bench_uvit_latent RC 1
             STDERR "${_berr}--latent '4x8x': not an integer"
             COMMAND ${_bench} uvit --latent 4x8x)
  cli_expect(cli_bench_uvit_gemm RC 1 STDERR "${_berr}--gemm: unknown value. expected auto . eigen . onednn"
             COMMAND ${_bench} ${_tiny_uvit} --gemm mkl)
  cli_expect(cli_bench_uvit_threads_5000 RC 1 STDERR "${_berr}--threads: integer out of range"
             COMMAND ${_bench} ${_tiny_uvit} --threads 5000)
  cli_expect(cli_bench_uvit_out_of_bounds RC 1
             STDERR "unidiffuser-bench: error: check_config_bounds: depth: value out of range"
             COMMAND ${_bench} uvit --depth 4096)
  cli_expect(cli_bench_uvit_out_of_memory RC 1
             STDERR "unidiffuser-bench: error: check_memory_fits: .*needs [0-9]+ MiB"
             COMMAND ${_bench} uvit --embed 16384 --depth 201 --heads 64)
  file(WRITE ${_cli}/serve_bad.txt "2\nthree\n")
  cli_expect(cli_bench_uvit_serve_bad_request RC 1 STDOUT "\"serve\": true"
             STDERR "${_berr}--serve request .forward count.: not an integer.* got 'three'"
             INPUT ${_cli}/serve_bad.txt COMMAND ${_bench} ${_tiny_uvit} --threads 1 --serve)
  cli_expect(cli_bench_fma_unknown_option RC 1 STDERR "${_berr}--bogus: unknown option"
             COMMAND ${_bench} fma --bogus 1)
  cli_expect(cli_bench_fma_threads_5000 RC 1 STDERR "${_berr}--threads: integer out of range"
             COMMAND ${_bench} fma --threads 5000)
  cli_expect(cli_bench_fma_seconds_inf RC 1 STDERR "${_berr}--seconds: not a finite number"
             COMMAND ${_bench} fma --seconds inf)
  file(WRITE ${_cli}/serve_fma.txt "0.01\n\n0.01\n")
  cli_expect(cli_bench_fma_serve RC 0 STDOUT "\"serve\": true.*gflops.*gflops"
             INPUT ${_cli}/serve_fma.txt COMMAND ${_bench} fma --threads 1 --serve)
  file(WRITE ${_cli}/serve_fma_bad.txt "0.01\n1e400\n")
  cli_expect(cli_bench_fma_serve_bad_request RC 1
             STDERR "${_berr}--serve request .seconds.: not a finite number.* got '1e400'"
             INPUT ${_cli}/serve_fma_bad.txt COMMAND ${_bench} fma --threads 1 --serve)
  cli_expect(cli_bench_unknown_subcommand RC 1 STDERR "${_berr}subcommand: unknown subcommand"
             COMMAND ${_bench} gemm)
endif()

# ---- oracle_demo -------------------------------------------------------------------------------
if(UNIDIFFUSER_BUILD_EXAMPLES)
  cli_expect(cli_oracle_demo_unknown_option RC 1
             STDERR "oracle_demo: error: command line: '--bogus': unexpected argument"
             COMMAND $<TARGET_FILE:oracle_demo> --bogus)
  # the three-modality example end to end on a network trained for a few steps
  cli_expect(example_three_groups_smoke RC 0 STDOUT "saved and reloaded .* .3 groups.*audio"
             COMMAND $<TARGET_FILE:three_groups> --train-steps 6 --samples 4
                     --out ${_cli}/three_groups.safetensors)
  cli_expect(cli_three_groups_unknown_option RC 1
             STDERR "three_groups: error: three_groups: --bogus: unknown option"
             COMMAND $<TARGET_FILE:three_groups> --bogus 1)
endif()

# ---- unidiffuser-shapes ------------------------------------------------------------------------
if(TARGET unidiffuser-shapes)
  set(_shapes $<TARGET_FILE:unidiffuser-shapes>)
  set(_serr "unidiffuser-shapes: error: ")
  cli_expect(cli_shapes_unknown_option RC 1 STDERR "${_serr}command line: --bogus: unknown option"
             COMMAND ${_shapes} --bogus)
  cli_expect(cli_shapes_train_option_without_retrain RC 1
             STDERR "${_serr}command line: --train-steps: applies with --retrain only"
             COMMAND ${_shapes} --train-steps 5)
  cli_expect(cli_shapes_missing_checkpoint RC 1
             STDERR "${_serr}.*${_cli}/none.safetensors.*cannot open"
             COMMAND ${_shapes} --checkpoint ${_cli}/none.safetensors --out ${_cli}/shapes-none)
  cli_expect(cli_shapes_steps_range RC 1 STDERR "${_serr}command line: --steps"
             COMMAND ${_shapes} --steps 0)
  cli_expect(cli_shapes_help RC 0 STDOUT "usage: unidiffuser-shapes" COMMAND ${_shapes} --help)
  cli_expect(cli_shapes_world_range RC 1 STDERR "${_serr}command line: --world"
             COMMAND ${_shapes} --retrain --world 3 --out ${_cli}/shapes-world)
endif()
if(TARGET unidiffuser-shapes3)
  set(_shapes3 $<TARGET_FILE:unidiffuser-shapes3>)
  set(_s3err "unidiffuser-shapes3: error: command line: ")
  cli_expect(cli_shapes3_loss_weights_count RC 1
             STDERR "${_s3err}--loss-weights: expected three comma-separated weights"
             COMMAND ${_shapes3} --retrain --loss-weights 1,2 --out ${_cli}/s3x)
  cli_expect(cli_shapes3_loss_weights_value RC 1 STDERR "${_s3err}--loss-weights: not a finite"
             COMMAND ${_shapes3} --retrain --loss-weights 1,,2 --out ${_cli}/s3x)
  cli_expect(cli_shapes3_interval_order RC 1 STDERR "${_s3err}--interval: expected LO,HI"
             COMMAND ${_shapes3} --interval 0.8,0.2 --out ${_cli}/s3x)
  cli_expect(cli_shapes3_scale_range RC 1 STDERR "${_s3err}--scale: number out of range"
             COMMAND ${_shapes3} --scale 1,25 --out ${_cli}/s3x)
  cli_expect(cli_shapes3_rescale_range RC 1 STDERR "${_s3err}--rescale: number out of range"
             COMMAND ${_shapes3} --rescale 1.5 --out ${_cli}/s3x)
endif()
