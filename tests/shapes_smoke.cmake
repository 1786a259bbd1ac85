# SPDX-License-Identifier: Apache-2.0
# Runs unidiffuser-shapes end to end on a network trained for a few steps (-DPROGRAM, -DOUT) and
# checks that it wrote the reports and a grid per mode.
file(REMOVE_RECURSE ${OUT})
execute_process(
  COMMAND ${PROGRAM} --retrain --train-steps 3 --batch 8 --embed 16 --depth 1 --heads 2
          --samples 8 --marginal-samples 16 --steps 3 --threads 2 --quiet --out ${OUT}
  RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "unidiffuser-shapes exited with ${rc}\n${out}\n${err}")
endif()
foreach(f report.md report.json shapes.safetensors t2i_s0.png t2i_s3.png i2t_s3.png joint_s3.png
          i.png t.png i2t2i_s3.png t2i2t_s3.png)
  if(NOT EXISTS ${OUT}/${f})
    message(FATAL_ERROR "unidiffuser-shapes did not write ${f}")
  endif()
endforeach()
file(READ ${OUT}/report.json report)
foreach(m t2i i2t joint i t i2t2i t2i2t control)
  string(FIND "${report}" "\"mode\": \"${m}\"" at)
  if(at EQUAL -1)
    message(FATAL_ERROR "report.json has no row of mode ${m}")
  endif()
endforeach()
