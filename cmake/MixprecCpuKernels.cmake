# mixprec_add_cpu_kernels(target src...): compiles each vectorised CPU kernel source once per CPU
# capability, the way ATen builds its own kernels (see csrc/ops/cpu/cpu_dispatch.h): a DEFAULT build
# everywhere and, on x86-64, an AVX2+FMA+F16C build chosen at run time. Each build sees
# CPU_CAPABILITY=<name>, which places ATen's vector types and the kernel in a namespace of that name.
#
# The files that use at::parallel_for also need OpenMP. They are compiled with -fopenmp but linked
# against the libgomp that ships inside torch, so a process holds one OpenMP runtime, not two.

function(mixprec_add_cpu_kernels target)
  set(_caps DEFAULT)
  set(_ids 0)
  if(CMAKE_SYSTEM_PROCESSOR MATCHES "x86_64|AMD64|amd64")
    list(APPEND _caps AVX2)
    list(APPEND _ids 1)
  endif()
  foreach(_src ${ARGN})
    get_filename_component(_abs ${_src} ABSOLUTE)
    get_filename_component(_name ${_src} NAME_WE)
    foreach(_i RANGE 0 1)
      list(LENGTH _caps _n)
      if(_i GREATER_EQUAL _n)
        break()
      endif()
      list(GET _caps ${_i} _cap)
      list(GET _ids ${_i} _id)
      set(_gen ${CMAKE_CURRENT_BINARY_DIR}/cpu_kernels/${_name}.${_cap}.cpp)
      file(CONFIGURE OUTPUT ${_gen} CONTENT "#include \"${_abs}\"\n" @ONLY)
      target_sources(${target} PRIVATE ${_gen})
      set_source_files_properties(${_gen} PROPERTIES SKIP_PRECOMPILE_HEADERS ON SKIP_UNITY_BUILD_INCLUSION ON
        COMPILE_DEFINITIONS "CPU_CAPABILITY=${_cap};CPU_CAPABILITY_${_cap};MIXPREC_CPU_CAPABILITY_ID=${_id}")
      if(_cap STREQUAL "AVX2")
        set_source_files_properties(${_gen} PROPERTIES COMPILE_OPTIONS "-mavx2;-mfma;-mf16c")
      endif()
    endforeach()
  endforeach()

  target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:-fopenmp>)
  set(_torch_libdirs)
  foreach(_p ${CMAKE_PREFIX_PATH})
    list(APPEND _torch_libdirs "${_p}/../../lib")
  endforeach()
  find_library(MIXPREC_TORCH_GOMP NAMES libgomp.so.1 gomp PATHS ${_torch_libdirs} NO_DEFAULT_PATH)
  if(MIXPREC_TORCH_GOMP)
    target_link_libraries(${target} PRIVATE ${MIXPREC_TORCH_GOMP})
  else()
    target_link_libraries(${target} PRIVATE -fopenmp)
  endif()
endfunction()
