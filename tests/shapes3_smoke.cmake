# SPDX-License-Identifier: Apache-2.0
# Runs unidiffuser-shapes3 end to end on a network trained for a few steps (-DPROGRAM, -DOUT) and
# checks that it wrote the reports and a grid per task.
file(REMOVE_RECURSE ${OUT})
execute_process(
  COMMAND ${PROGRAM} --retrain --train-steps 3 --batch 8 --embed 16 --depth 1 --heads 2
          --samples 8 --marginal-samples 16 --steps 3 --threads 2 --quiet --out ${OUT}
  RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "unidiffuser-shapes3 exited with ${rc}\n${out}\n${err}")
endif()
foreach(f report.md report.json shapes3.safetensors t_i_s0.png t_i_s3.png w_t_s3.png iw_t_s3.png
          i_tw_s3.png joint_s3.png i.png t.png w.png)
  if(NOT EXISTS ${OUT}/${f})
    message(FATAL_ERROR "unidiffuser-shapes3 did not write ${f}")
  endif()
endforeach()
file(READ ${OUT}/report.json report)
foreach(m "i->t" "i->w" "t->i" "t->w" "w->i" "w->t" "tw->i" "iw->t" "it->w" "i->tw" "t->iw"
          "w->it" joint i t w control)
  string(FIND "${report}" "\"mode\": \"${m}\"" at)
  if(at EQUAL -1)
    message(FATAL_ERROR "report.json has no row of mode ${m}")
  endif()
endforeach()
# a missing checkpoint is refused by name
execute_process(COMMAND ${PROGRAM} --checkpoint ${OUT}/nonexistent.safetensors --out ${OUT}/x
                RESULT_VARIABLE rc ERROR_VARIABLE err)
if(rc EQUAL 0 OR NOT err MATCHES "nonexistent")
  message(FATAL_ERROR "a missing checkpoint was not refused by name: ${rc} ${err}")
endif()
