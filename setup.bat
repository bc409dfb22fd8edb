@echo off
rem imsrc setup for Windows: creates .venv, installs imsrc (exact versions from constraints.txt), starts the
rem embedded database, migrates.
rem   setup.bat          set up
rem   setup.bat serve    set up, then run the web page and API
rem   setup.bat test     also install the test tools, then run the test suite
setlocal
cd /d "%~dp0"
set VENV=.venv
set PY=%VENV%\Scripts\python.exe

set CMD=%1
if "%CMD%"=="" set CMD=setup
if "%CMD%"=="setup" goto known
if "%CMD%"=="serve" goto known
if "%CMD%"=="test" goto known
echo setup.bat: error: unknown command '%CMD%' (use: setup.bat [serve^|test])
exit /b 1
:known
rem serve and setup need the service alone; test adds the test extra.
set LEVEL=runtime
set TARGET=.
if "%CMD%"=="test" set LEVEL=test
if "%CMD%"=="test" set TARGET=.[test]

if not exist "%PY%" (
    echo ==^> creating %VENV%
    py -3.11 -m venv %VENV% 2>nul || python -m venv %VENV% || (echo setup.bat: error: Python 3.11 or newer is needed & exit /b 1)
)
rem The stamp is a copy of pyproject.toml + constraints.txt as installed, per level: an unchanged checkout never
rem reinstalls, and a venv set up for the tests also serves.
copy /b /y pyproject.toml+constraints.txt "%VENV%\.imsrc-wanted" >nul
fc /b "%VENV%\.imsrc-wanted" "%VENV%\.imsrc-installed-test" >nul 2>&1 && goto installed
fc /b "%VENV%\.imsrc-wanted" "%VENV%\.imsrc-installed-%LEVEL%" >nul 2>&1 && goto installed
echo ==^> installing imsrc (%LEVEL%) and its dependencies (torch is large; the first time takes a while)
"%PY%" -m pip install --quiet --upgrade pip || exit /b 1
"%PY%" -m pip install --quiet -c constraints.txt -e "%TARGET%" || exit /b 1
copy /y "%VENV%\.imsrc-wanted" "%VENV%\.imsrc-installed-%LEVEL%" >nul
:installed

if "%CMD%"=="test" (
    "%PY%" -m pytest %2 %3 %4 %5 %6 %7 %8 %9
    exit /b %ERRORLEVEL%
)
if not exist data mkdir data
"%VENV%\Scripts\imsrc.exe" db start || exit /b 1
"%VENV%\Scripts\imsrc.exe" migrate || exit /b 1
if "%CMD%"=="serve" (
    "%VENV%\Scripts\imsrc.exe" serve %2 %3 %4 %5 %6 %7 %8 %9
    exit /b %ERRORLEVEL%
)
echo ==^> ready: setup.bat serve
exit /b 0
