# Runs one fuzz target for SECONDS on a copy of its seed corpus; CTest's fuzz.<name> tests
# call it. Usage:
#   cmake -DFUZZER=<binary> -DSEEDS=<fuzz/corpus/x> -DWORK=<dir> [-DDICT=<file>] -DSECONDS=<n> -P run_fuzz.cmake
# The corpus grows in WORK/corpus across runs; a crash or a property violation fails the
# test and leaves the input in WORK/artifacts.
foreach(_var FUZZER SEEDS WORK SECONDS)
  if(NOT DEFINED ${_var})
    message(FATAL_ERROR "run_fuzz.cmake: -D${_var}=… is required")
  endif()
endforeach()

file(MAKE_DIRECTORY "${WORK}/corpus" "${WORK}/artifacts")
file(GLOB _seeds "${SEEDS}/*")
if(_seeds)
  file(COPY ${_seeds} DESTINATION "${WORK}/corpus")
endif()

set(_args -max_total_time=${SECONDS} -timeout=5 -rss_limit_mb=2048 -print_final_stats=1
          -artifact_prefix=${WORK}/artifacts/)
if(DICT AND EXISTS "${DICT}")
  list(APPEND _args -dict=${DICT})
endif()
execute_process(COMMAND "${FUZZER}" ${_args} "${WORK}/corpus" RESULT_VARIABLE _rc)
if(NOT _rc EQUAL 0)
  file(GLOB _found "${WORK}/artifacts/*")
  message(FATAL_ERROR "${FUZZER} failed (${_rc}). Input(s): ${_found}\n"
                      "Reproduce: ${FUZZER} <input>  (docs/FUZZING.md)")
endif()
