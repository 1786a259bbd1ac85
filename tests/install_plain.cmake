# SPDX-License-Identifier: Apache-2.0
# `cmake --install` right after a plain configure (defaults, nothing built) installs the
# header-only library and its package files (-DSOURCE, -DWORK, -DGENERATOR).
file(REMOVE_RECURSE ${WORK})
execute_process(COMMAND ${CMAKE_COMMAND} -S ${SOURCE} -B ${WORK}/build -G ${GENERATOR}
                RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "plain configure failed (${rc})\n${out}\n${err}")
endif()
execute_process(COMMAND ${CMAKE_COMMAND} --install ${WORK}/build --prefix ${WORK}/prefix
                RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "cmake --install after a plain configure failed (${rc})\n${out}\n${err}")
endif()
if(NOT EXISTS ${WORK}/prefix/include/unidiffuser/unidiffuser.hpp)
  message(FATAL_ERROR "the headers were not installed")
endif()
file(GLOB_RECURSE config ${WORK}/prefix/*/unidiffuserConfig.cmake)
file(GLOB_RECURSE targets ${WORK}/prefix/*/unidiffuserTargets.cmake)
if(NOT config OR NOT targets)
  message(FATAL_ERROR "the package files were not installed")
endif()
file(READ ${targets} t)
string(FIND "${t}" "unidiffuser::native" at)
if(at EQUAL -1)
  message(FATAL_ERROR "the installed package has no unidiffuser::native target")
endif()
file(REMOVE_RECURSE ${WORK})
