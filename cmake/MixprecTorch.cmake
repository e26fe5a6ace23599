# Finds LibTorch (normally the pip torch: -DCMAKE_PREFIX_PATH=$(python -c 'import torch;print(torch.utils.cmake_prefix_path)'))
# and, when wanted, CUDA. Sets MIXPREC_CUDA_ENABLED and defines mixprec_link_torch(target).

# The pip wheels ship CUDA's runtime libraries under site-packages/nvidia/*/lib. Torch's CMake config
# lists nvrtc among its libraries and fails the link with a NOTFOUND when the toolkit lacks it, so
# point it at the wheel's copy when the toolkit has none.
set(_mixprec_wheel_libdirs)
foreach(_p ${CMAKE_PREFIX_PATH})
  file(GLOB _dirs "${_p}/../../../nvidia/*/lib")
  list(APPEND _mixprec_wheel_libdirs ${_dirs})
endforeach()

set(_want_cuda ${MIXPREC_WITH_CUDA})
if(_want_cuda STREQUAL "AUTO")
  include(CheckLanguage)
  check_language(CUDA)
  set(_torch_libdirs)
  foreach(_p ${CMAKE_PREFIX_PATH})
    list(APPEND _torch_libdirs "${_p}/../../lib")
  endforeach()
  find_library(MIXPREC_TORCH_C10_CUDA c10_cuda PATHS ${_torch_libdirs} NO_DEFAULT_PATH)
  if(CMAKE_CUDA_COMPILER AND MIXPREC_TORCH_C10_CUDA)
    set(_want_cuda ON)
  else()
    set(_want_cuda OFF)
  endif()
  message(STATUS "mixprec: MIXPREC_WITH_CUDA=AUTO -> ${_want_cuda}")
endif()

if(_want_cuda)
  enable_language(CUDA)
  if(NOT DEFINED ENV{TORCH_CUDA_ARCH_LIST})
    set(_archs "${MIXPREC_CUDA_ARCHS}")
    # Blackwell (10.0, 12.0) needs nvcc >= 12.8: an older toolkit builds the rest, with PTX of its newest.
    if(CMAKE_CUDA_COMPILER_VERSION VERSION_LESS 12.8 AND _archs MATCHES "1[02]\\.0")
      list(FILTER _archs EXCLUDE REGEX "^1[02]\\.0")
      list(GET _archs -1 _newest)
      string(REPLACE "+PTX" "" _newest_plain "${_newest}")
      list(REMOVE_AT _archs -1)
      list(APPEND _archs "${_newest_plain}+PTX")
      message(STATUS "mixprec: nvcc ${CMAKE_CUDA_COMPILER_VERSION} predates Blackwell; CUDA archs ${_archs}")
    endif()
    set(TORCH_CUDA_ARCH_LIST "${_archs}")
  endif()
  # Torch's config locates the toolkit with the old FindCUDA, from the directory of the first nvcc on
  # PATH; a wrapper script such as /usr/local/bin/nvcc misleads it. The compiler knows its real root.
  if(NOT CUDA_TOOLKIT_ROOT_DIR AND CMAKE_CUDA_COMPILER_TOOLKIT_ROOT)
    set(CUDA_TOOLKIT_ROOT_DIR "${CMAKE_CUDA_COMPILER_TOOLKIT_ROOT}" CACHE PATH "CUDA toolkit root")
  endif()
  # Torch's config picks the -gencode flags from TORCH_CUDA_ARCH_LIST and warns when CMake's own
  # architecture variable is set; hand the choice to torch, then tell CMake to add nothing.
  unset(CMAKE_CUDA_ARCHITECTURES)
  unset(CMAKE_CUDA_ARCHITECTURES CACHE)
endif()

# A CUDA build of torch looks for the toolkit even when libmixprec is built without CUDA; offer the
# usual places (a wrapper nvcc first on PATH would otherwise point it at the wrong prefix).
if(NOT CUDA_TOOLKIT_ROOT_DIR)
  foreach(_root $ENV{CUDA_HOME} $ENV{CUDA_PATH} /usr/local/cuda)
    if(EXISTS "${_root}/include/cuda_runtime.h")
      set(CUDA_TOOLKIT_ROOT_DIR "${_root}" CACHE PATH "CUDA toolkit root")
      break()
    endif()
  endforeach()
endif()

if(NOT CUDA_nvrtc_LIBRARY)
  find_library(CUDA_nvrtc_LIBRARY NAMES nvrtc libnvrtc.so.13 libnvrtc.so.12
    HINTS ${CMAKE_CUDA_COMPILER_TOOLKIT_ROOT}/lib64 ${_mixprec_wheel_libdirs})
endif()

find_package(Torch REQUIRED)
set(MIXPREC_CUDA_ENABLED ${_want_cuda})
if(MIXPREC_CUDA_ENABLED)
  set(CMAKE_CUDA_ARCHITECTURES OFF)
endif()

# cuBLASLt (the weight-gradient GEMM). torch's pip wheel brings its own copy in site-packages/nvidia/*/:
# link that one where it exists (else the toolkit's), and take the header from the toolkit or, where the
# toolkit lacks it, from the wheel through a folder of its own, so the wheel's other CUDA headers never
# shadow the toolkit's.
if(MIXPREC_CUDA_ENABLED)
  find_package(CUDAToolkit REQUIRED)
  set(_mixprec_wheel_incdirs)
  foreach(_d ${_mixprec_wheel_libdirs})
    list(APPEND _mixprec_wheel_incdirs "${_d}/../include")
  endforeach()
  # torch's own copy (the wheel's) first: the handle libmixprec borrows from torch was made by it.
  find_library(MIXPREC_CUBLASLT_LIBRARY NAMES libcublasLt.so.13 libcublasLt.so.12 cublasLt NAMES_PER_DIR
    HINTS ${_mixprec_wheel_libdirs} ${CUDAToolkit_LIBRARY_DIR})
  find_path(MIXPREC_CUBLASLT_INCLUDE cublasLt.h HINTS ${CUDAToolkit_INCLUDE_DIRS} NO_DEFAULT_PATH)
  if(NOT MIXPREC_CUBLASLT_INCLUDE)
    find_path(_mixprec_wheel_cublaslt cublasLt.h HINTS ${_mixprec_wheel_incdirs} NO_DEFAULT_PATH)
    if(_mixprec_wheel_cublaslt)
      set(MIXPREC_CUBLASLT_INCLUDE "${CMAKE_BINARY_DIR}/cublaslt-include")
      file(COPY "${_mixprec_wheel_cublaslt}/cublasLt.h" "${_mixprec_wheel_cublaslt}/cublas_api.h"
           DESTINATION "${MIXPREC_CUBLASLT_INCLUDE}")
    endif()
  endif()
  if(NOT MIXPREC_CUBLASLT_LIBRARY OR NOT MIXPREC_CUBLASLT_INCLUDE)
    message(FATAL_ERROR "mixprec: cuBLASLt not found (library: ${MIXPREC_CUBLASLT_LIBRARY}, header: "
      "${MIXPREC_CUBLASLT_INCLUDE}); install the CUDA toolkit's cuBLAS or the nvidia-cublas wheel, or build "
      "with -DMIXPREC_WITH_CUDA=OFF")
  endif()
  message(STATUS "mixprec: cuBLASLt ${MIXPREC_CUBLASLT_LIBRARY} (header in ${MIXPREC_CUBLASLT_INCLUDE})")
endif()

# libmixprec needs torch, c10 and, with CUDA, c10_cuda, the CUDA runtime and cuBLASLt; nothing of nvrtc.
function(mixprec_link_torch target)
  target_link_libraries(${target} PUBLIC torch)
  set(_extra)
  foreach(_lib ${TORCH_LIBRARIES})
    if(NOT _lib STREQUAL "torch" AND NOT _lib MATCHES "NOTFOUND" AND NOT _lib MATCHES "nvrtc")
      list(APPEND _extra ${_lib})
    endif()
  endforeach()
  target_link_libraries(${target} PRIVATE ${_extra})
  if(MIXPREC_CUDA_ENABLED)
    target_link_libraries(${target} PRIVATE CUDA::cudart ${MIXPREC_CUBLASLT_LIBRARY})
    target_include_directories(${target} SYSTEM PRIVATE ${MIXPREC_CUBLASLT_INCLUDE})
  endif()
endfunction()
